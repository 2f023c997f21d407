"""The shipped lm-eval task YAMLs and their loader/scorer (utils.py); lm-eval reads them via --include_path."""
