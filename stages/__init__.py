"""The stage scripts, one per dvc.yaml stage: python -m stages.<name>."""
