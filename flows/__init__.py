"""Prefect flows: `finetune`, `extract-glue` (and its `extract-shards`), `train-adapter`,
`sweep`, `ensemble` and `pipeline`. Each flow body reads like the pipeline diagram."""
