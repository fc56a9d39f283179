"""Bundle tests: the real bundles under bundles/, and ``tiny_bundle`` (tests/conftest.py: the real
bundle's configs, LICENSE and docs around a tiny untrained package for the same terms) that runs
in a second."""
