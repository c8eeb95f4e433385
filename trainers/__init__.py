"""Learning algorithms: subclasses of trainers.base.Trainer, chosen by `trainer.path` in YAML."""
