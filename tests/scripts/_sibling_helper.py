"""Imported by timm_validate_like.py from its own folder (checks the runner's sys.path handling)."""
VALUE = 'sibling-ok'
