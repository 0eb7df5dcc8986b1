"""tritonembed.client."""
