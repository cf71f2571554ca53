"""Pipeline steps: each a plain function the CLI, the DAGs and the tests call."""
