"""tritonembed.model_repository."""
