"""tritonembed.gateway."""
