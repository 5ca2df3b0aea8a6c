"""The DAG machinery: dvc.yaml -> Snakemake rules (dag.py), recipe workspaces (workspace.py)."""
