"""One module per stage of dvc.yaml: a thin `main()` over functions of the core; no stage
imports another."""
