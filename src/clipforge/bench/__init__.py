"""Benchmarks of clipforge against open_clip (Ilharco et al., 2021): they import the library, never the
other way round. ``clipforge-benchmark`` runs them; ``scripts/benchmark_*.py`` are thin wrappers."""
