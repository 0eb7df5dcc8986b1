"""tritonembed.benchmarks."""
