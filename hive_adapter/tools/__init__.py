"""Command-line tools and stand-ins: toy models and their pre-training, the vision-encoder export, a real LM
without the hub, hive-serve."""
