"""Data curation on datatrove: a recipe (data_recipes/*.yaml, schema config/recipe.py) -> token shards
+ manifest.json (docs/data_contract.md). Entry point: `pipeline/curate.py` (see docs/curation.md).
Modules, one job each:

    sources        readers for jsonl / parquet / folders / hub datasets / stdlib / pydoc; fail-fast checks
    wordtok        the offline word tokenizer given to datatrove's filters, MinHash and decontamination
    filters        Gopher, C4, FineWeb filters from recipe thresholds; offline language id
    dedup          exact and MinHash dedup configs
    decont         eval sets (local jsonl, lm-eval tasks) -> n-gram index for NGramsDecontFilter
    splits         seeded train/validation assignment by document id
    spm_tokenizer  sentencepiece training, tokenizer.json with identical ids, the tokenizer stage
    stages         the run as ordered datatrove stages; layout: where every file lives
    executors      stages -> Local / Slurm / Ray executors
    preflight      every check made before processing starts
    finalize       publish shards, write manifest.json and report.json; report: the report itself
    manifest       the typed manifest reader pretraining and eval import
"""
