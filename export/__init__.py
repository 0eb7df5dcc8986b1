"""tritonembed.export."""
