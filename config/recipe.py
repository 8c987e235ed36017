"""RecipeConfig: the typed schema of a data-curation recipe (data_recipes/*.yaml).

    recipe = load_recipe("embedded")          # a name in data_recipes/ or a path
    recipe = load_recipe("my.yaml", ["output.validation_fraction=0.02"])

A recipe names its sources and every threshold of the stages `pipeline/curate.py` runs: quality
filters, exact + MinHash dedup, n-gram decontamination, tokenizer training, sharding, and the cluster
resources of the Slurm/Ray executors. Unknown keys and out-of-range values are `ConfigError`s naming
the dotted key. Relative paths in a recipe are relative to the recipe file's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, model_validator

from config.base import StrictModel
from config.loader import load, resolve_named_yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "data_recipes"
FilterName = Literal["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]
SourceType = Literal["jsonl", "parquet", "folder", "hf", "stdlib_source", "python_packages", "pydoc"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SourceConfig(StrictModel):
    """One input corpus. Documents keep `metadata` fields; everything else from the input is dropped."""

    name: str = Field(..., description="Folder name of the source in the outputs ([A-Za-z0-9_.-]).")
    type: SourceType = Field(
        ...,
        description="jsonl / parquet: files under `path`; folder: one document per text file under `path`; "
        "hf: a Hugging Face hub dataset, streamed; stdlib_source: this interpreter's standard-library "
        ".py files; python_packages: the .py files of this interpreter's installed packages (site-packages); "
        "pydoc: pydoc plain-text documentation of the standard-library modules.",
    )
    path: str | None = Field(None, description="Local file or folder (jsonl, parquet, folder).")
    glob: str | None = Field(None, description="File pattern under `path`; default by type (e.g. **/*.jsonl*).")
    exclude: list[str] = Field(
        default_factory=list,
        description="folder/stdlib_source/python_packages: path parts to skip (e.g. test, site-packages); "
        "pydoc: module names.",
    )
    hub_id: str | None = Field(None, description="hf: dataset repository id, e.g. HuggingFaceFW/fineweb-edu.")
    hub_config: str | None = Field(None, description="hf: dataset configuration (subset) name.")
    hub_data_dir: str | None = Field(None, description="hf: folder of the repository to read (data_dir).")
    split: str = Field("train", description="hf: split to stream.")
    revision: str | None = Field(None, description="hf: git revision of the dataset repository.")
    text_key: str = Field("text", description="Field holding the document text.")
    id_key: str = Field("id", description="Field holding a stable document id (default: file/line).")
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Kept metadata: output key -> input field name."
    )
    weight: float = Field(1.0, gt=0, description="Relative share of the training token stream.")
    limit: int | None = Field(
        None, ge=1, description="Read at most this many documents (split evenly over the tasks, rounded up)."
    )
    filters: list[FilterName] | None = Field(
        None, description="Quality filters applied to this source; default: every enabled filter; [] none."
    )

    @model_validator(mode="after")
    def _check(self) -> "SourceConfig":
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must match {_NAME.pattern}")
        if self.type in ("jsonl", "parquet", "folder") and not self.path:
            raise ValueError(f"path is required for a {self.type} source")
        if self.type == "hf" and not self.hub_id:
            raise ValueError("hub_id is required for an hf source")
        return self


class LanguageFilterConfig(StrictModel):
    """Offline language id (py3langid, model inside the wheel): keep documents in `languages`."""

    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep.")
    threshold: float = Field(0.65, ge=0, le=1, description="Minimum probability of a kept language.")
    max_chars: int = Field(20000, ge=100, description="Characters of each document the classifier reads.")


class GopherRepetitionConfig(StrictModel):
    """Gopher repetition rules (Rae et al. 2021, table A1); fractions of lines/paragraphs/characters."""

    enabled: bool = True
    dup_line_frac: float | None = Field(0.3, ge=0, le=1)
    dup_para_frac: float | None = Field(0.3, ge=0, le=1)
    dup_line_char_frac: float | None = Field(0.2, ge=0, le=1)
    dup_para_char_frac: float | None = Field(0.2, ge=0, le=1)
    top_n_grams: list[tuple[int, float]] = Field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )


class GopherQualityConfig(StrictModel):
    """Gopher quality heuristics: word counts/lengths, symbol ratios, stop words."""

    enabled: bool = True
    min_doc_words: int | None = Field(50, ge=0)
    max_doc_words: int | None = Field(100000, ge=1)
    min_avg_word_length: int | None = Field(3, ge=0)
    max_avg_word_length: int | None = Field(10, ge=1)
    max_symbol_word_ratio: float | None = Field(0.1, ge=0)
    max_bullet_lines_ratio: float | None = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float | None = Field(0.3, ge=0, le=1)
    max_non_alpha_words_ratio: float | None = Field(
        0.8, ge=0, le=1, description="Minimum share of words with a letter (datatrove's name)."
    )
    min_stop_words: int | None = Field(2, ge=0)


class C4FilterConfig(StrictModel):
    """C4 line/document rules (Raffel et al. 2020). Defaults as FineWeb ran it (no terminal-punct rule)."""

    enabled: bool = True
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = False
    min_num_sentences: int = Field(5, ge=-1, description="-1 disables.")
    min_words_per_line: int = Field(3, ge=-1, description="-1 disables.")
    max_word_length: int = Field(1000, ge=-1, description="-1 disables.")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebFilterConfig(StrictModel):
    """FineWeb's own line-level quality rules (Penedo et al. 2024)."""

    enabled: bool = True
    line_punct_thr: float = Field(0.12, ge=0, le=1)
    line_punct_exclude_zero: bool = False
    short_line_thr: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=0)
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1)
    new_line_ratio: float = Field(0.3, ge=0)


class FiltersConfig(StrictModel):
    """Quality filters, applied in this order (FineWeb's) to the sources that select them."""

    language: LanguageFilterConfig = LanguageFilterConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4FilterConfig = C4FilterConfig()
    fineweb: FineWebFilterConfig = FineWebFilterConfig()


class MinhashSettings(StrictModel):
    """MinHash LSH near-dedup. Defaults are FineWeb's: 5-grams, 14 buckets x 8 hashes, 64-bit hashes
    (P(dedup) ~ 0.92 at Jaccard 0.8, threshold ~0.72)."""

    enabled: bool = True
    n_grams: int = Field(5, ge=1, description="Words per shingle.")
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)
    hash_precision: Literal[32, 64] = 64
    seed: int = 1


class DedupConfig(StrictModel):
    exact: bool = Field(True, description="Drop documents whose full text repeats (keeps the first).")
    minhash: MinhashSettings = MinhashSettings()


class EvalSetFile(StrictModel):
    """A local eval set: jsonl with one passage per line."""

    name: str = Field(..., description="Task name reported for matches.")
    path: str
    text_key: str = Field("text", description="Field holding the answer/passage (a string), or the list of "
                          "choices of a multiple-choice item (then set gold_key).")
    query_key: str | None = Field(None, description="Optional field holding the prompt/question.")
    gold_key: str | None = Field(None, description="Multiple choice: field holding the gold choice's index "
                                 "(int, digit or letter, A = 0) or a list of them; only those choices are indexed.")


class DecontConfig(StrictModel):
    """Drop training documents that share an n-gram with an eval set (datatrove's NGramsDecontFilter)."""

    enabled: bool = True
    n_grams: int = Field(13, ge=1, description="Words per n-gram (GPT-3's 13-gram rule).")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-eval task names; their data must be in the local HF cache."
    )
    lm_eval_include_path: str | None = Field(None, description="Folder of extra lm-eval task YAMLs.")
    files: list[EvalSetFile] = Field(default_factory=list)
    find_query_ngrams: bool = Field(False, description="Also match n-grams of the prompts, not only answers.")


class TokenizerConfig(StrictModel):
    """Train a sentencepiece BPE (byte fallback, <pad>=0 <s>=1 </s>=2 <unk>=3) or reuse one."""

    path: str | None = Field(
        None, description="Reuse this sentencepiece .model (trained with these settings); tokenizer.json is "
        "regenerated from it.",
    )
    vocab_size: int = Field(32000, ge=300, le=2**32)
    sample_docs: int = Field(200000, ge=1, description="Curated training documents sampled for training.")
    character_coverage: float = Field(0.9999, gt=0, le=1)
    input_sentence_size: int = Field(2_000_000, ge=1000, description="Lines of the sample used (seeded subsample).")
    max_sentence_length: int = Field(16384, ge=64, description="Longer lines are skipped in training (bytes).")
    split_digits: bool = True


class OutputConfig(StrictModel):
    """Token shards, validation split and the train-token budget."""

    shard_tokens: int = Field(100_000_000, ge=1000, description="Max tokens per .ds shard.")
    validation_fraction: float = Field(0.01, gt=0, lt=1, description="Documents held out (by id hash).")
    seed: int = Field(1234, description="Split hash, document shuffles and tokenizer sampling.")
    total_tokens: int | None = Field(
        None, ge=1, description="Train-token budget split over sources by weight; default: keep all."
    )


class SlurmResources(StrictModel):
    """Per-stage overrides of the Slurm job resources."""

    time: str | None = None
    cpus_per_task: int | None = Field(None, ge=1)
    mem_per_cpu_gb: int | None = Field(None, ge=1)


class SlurmConfig(StrictModel):
    """Arguments of datatrove's SlurmPipelineExecutor (one job array per stage, chained)."""

    partition: str = "cpu"
    time: str = Field("24:00:00", description="Per-job time limit (HH:MM:SS).")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    qos: str = "normal"
    workers: int = Field(-1, description="Max concurrent tasks per stage; -1 no limit.")
    job_name: str = "curate"
    venv_path: str | None = Field(None, description="Virtualenv activated in each job.")
    env_command: str | None = Field(None, description="Shell command run before each job (modules, conda).")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="Extra sbatch --key=value.")
    max_array_size: int = Field(1001, ge=1)
    stage_resources: dict[str, SlurmResources] = Field(
        default_factory=dict,
        description="Stage name (e.g. minhash.cluster) or group (e.g. tokenize) -> resources for its jobs.",
    )

    def resources(self, stage: str) -> dict:
        """time / cpus_per_task / mem_per_cpu_gb of one stage: its override, else its group's, else the default."""
        base = {"time": self.time, "cpus_per_task": self.cpus_per_task, "mem_per_cpu_gb": self.mem_per_cpu_gb}
        override = self.stage_resources.get(stage) or self.stage_resources.get(stage.split(".")[0])
        return base | (override.model_dump(exclude_none=True) if override else {})


class RayConfig(StrictModel):
    """Arguments of datatrove's RayPipelineExecutor (the Ray cluster must be reachable)."""

    address: str | None = Field(None, description="ray.init address; default: local or RAY_ADDRESS.")
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2, gt=0)
    workers: int = Field(-1, description="Max concurrent tasks per stage; -1 no limit.")
    time: int | None = Field(None, ge=1, description="Per-task time limit in seconds.")


class ClusterConfig(StrictModel):
    """Parallelism. `tasks` fixes how data is sharded, so it fixes the output: change it only on a
    fresh output folder. Executors only change where the tasks run."""

    tasks: int = Field(4, ge=1, description="Tasks of every parallel stage.")
    slurm: SlurmConfig = SlurmConfig()
    ray: RayConfig = RayConfig()


class RecipeConfig(StrictModel):
    name: str
    description: str = ""
    sources: list[SourceConfig] = Field(..., min_length=1)
    filters: FiltersConfig = FiltersConfig()
    dedup: DedupConfig = DedupConfig()
    decontamination: DecontConfig = DecontConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    output: OutputConfig = OutputConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check(self) -> "RecipeConfig":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources.name must be unique, repeated: {', '.join(dupes)}")
        return self

    def weights(self) -> dict[str, float]:
        """Source name -> share of the training token stream (sums to 1)."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    def sha256(self) -> str:
        """Hash of the validated recipe (canonical JSON), recorded in the manifest."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a recipe in data_recipes/ (with or without .yaml)."""
    return resolve_named_yaml(name_or_path, RECIPES_DIR, "recipe")


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> tuple[RecipeConfig, Path]:
    """Validated recipe and the folder its relative paths are resolved against."""
    path = resolve_recipe_path(name_or_path)
    return load(RecipeConfig, path, overrides), path.resolve().parent


__all__ = ["RecipeConfig", "SourceConfig", "load_recipe", "resolve_recipe_path", "RECIPES_DIR"]
