"""Thin wrapper around ``clipforge-convert`` (clipforge.convert_cli): export to / import from open_clip."""

from clipforge.convert_cli import cli

if __name__ == "__main__":
    raise SystemExit(cli())
