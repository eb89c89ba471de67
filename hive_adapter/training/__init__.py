"""hive-train: its command line, HIVE's own flags, the stages of Table 3, the stage plan, the trainer, checkpoints
and resumes."""
