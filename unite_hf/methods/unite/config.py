"""UNITE's settings (torch-free: the CLI generates ``unite-hf extract`` options from this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, check_tucker_rank, corpus_problem, option, parse_rank

DEFAULT_CALIBRATION = "wikitext2"
"""The default calibration corpus (``unite_hf.calibration.DEFAULT_CALIBRATION`` is this)."""
FUSION_NAMES = ["concat", "fisher", "fisher_aligned", "fisher_diag", "frequency", "uniform"]
"""The built-in fusions (``unite_hf.fusion.FUSIONS``; registered ones are checked when extraction starts)."""
DECOMPOSITION_NAMES = ["cp", "svd", "tucker", "tucker_hidden"]
"""The built-in decompositions (``unite_hf.decomposition.DECOMPOSITIONS``)."""
REFIT_NAMES = ["distill", "none", "ridge"]
"""The built-in output-matched refits (``unite_hf.refit.REFITS``)."""
LABEL_MODE_NAMES = ["empirical", "sampled"]
"""``unite_hf.importance.LABEL_MODES``."""
VARIABLE_WIDTH_FUSIONS = ("concat",)
"""Built-in fusions whose fused FFN width can differ from the experts' (``fused_width``)."""


@dataclass
class UniteExtractionConfig(MethodConfig):
    """How :func:`~unite_hf.extract_universal_knowledge` builds a UNITE gene (paper §3.1-3.2 defaults).

    Only the recipe: the source model, tokenizer, precomputed importance and progress switches are
    arguments of the extract call, not settings of the method.
    """

    method = "unite"
    cli_inputs = {
        "importance": {"flag": "--importance", "metavar": "GENE",
                       "help": "reuse the Fisher and routing frequency of this UNITE gene (no calibration pass); with "
                               "a local --source folder the experts are then streamed from its safetensors shards"},
        "spill_dir": {"flag": "--spill-dir", "metavar": "DIR",
                      "help": "scratch folder for streamed per-layer fused experts (default: the system temp folder)"},
    }

    calibration: Any = option(DEFAULT_CALIBRATION, help="calibration corpus: 'wikitext2', a local text file or a Hub "
                              "dataset id (in Python also a list of strings, a Dataset or an input_ids tensor)")
    num_sequences: int = option(128, help="calibration sequences N")
    seq_len: int = option(512, help="tokens per calibration sequence T")
    seed: int = option(0, help="seed of the calibration windows (and of sampled Fisher labels)")
    text_column: str | None = option(None, help="text column of a calibration dataset (default: auto)")
    dataset_config: str | None = option(None, help="config name of a Hub calibration dataset")
    split: str = option("train", help="split of a Hub calibration dataset")
    batch_size: int = option(8, help="calibration sequences per Fisher pass")
    fisher_labels: str = option("empirical", choices=LABEL_MODE_NAMES,
                                help="observed next tokens (empirical), or labels sampled from the model (the true Fisher)")
    train_mode: bool = option(False, help="calibrate in train mode (dropout off), for remote-code MoEs whose eval path "
                              "disables autograd")
    fusion: str = option("fisher", choices=FUSION_NAMES,
                         help="how each layer's experts become one FFN (fisher: the paper's Eq. 3)")
    fused_width: int | None = option(None, help="width of the fused FFN, only with fusion concat (1..E*I, default E*I)")
    decomposition: str = option("tucker", choices=DECOMPOSITION_NAMES,
                                help="how the fused FFNs of all layers are factorized")
    rank: int | tuple[int, int, int] | dict[str, int] | None = option(
        None, parse=parse_rank, metavar="R",
        help="Tucker rank: r (meaning (L, r, r)), r_L,r_out,r_in, or per axis hidden=R,neuron=R[,layer=R] "
             "(default: 512, clipped to the dimensions)")
    budget: float | None = option(None, help="parameter budget of a target layer's FFN as a fraction of the routed "
                                  "experts' (e.g. 0.25): picks fused_width and per-axis ranks dense-first (full hidden "
                                  "rank, the widest FFN that fits); instead of rank and fused_width")
    n_iter_max: int = option(25, help="HOOI/ALS iterations")
    activation_aware: bool = option(False, help="weight each projection by its calibration inputs' second moment "
                                    "before decomposing (one more inference pass)")
    refit: str = option("none", choices=REFIT_NAMES,
                        help="fit each layer's cores to the source's routed output on the calibration text after "
                             "decomposing: none (the paper), ridge (closed-form down core), distill (ridge, then Adam "
                             "on every core)")
    refit_ridge: float = option(1e-4, help="ridge strength of the refit, relative to the mean eigenvalues of the "
                                "statistics (0: plain least squares)")
    refit_sequential: bool = option(False, help="refit layer l on the inputs it sees once the earlier MoE layers are "
                                    "refitted (what a full-depth target sees; a partial pass per layer)")
    refit_steps: int = option(300, help="Adam steps per layer of the distill refit")
    refit_lr: float = option(1e-3, help="Adam learning rate of the distill refit")
    refit_max_tokens: int = option(16384, help="calibration tokens kept per layer for the distill refit")
    refit_max_memory_gb: float = option(4.0, help="memory for the refit's per-layer statistics: layers are refitted "
                                        "in groups that fit, one partial calibration pass per group")

    def __post_init__(self) -> None:
        for name in ("num_sequences", "seq_len", "batch_size", "n_iter_max", "refit_max_tokens"):
            self._check_int(name)
        self._check_int("refit_steps", minimum=0)
        self._check_number("refit_ridge")
        self._check_number("refit_lr", strictly=True)
        self._check_number("refit_max_memory_gb", strictly=True)
        self._check_bool("refit_sequential")
        self._check_str("refit")  # registered refits are checked when extraction starts, as fusions
        self._check_int("seed", minimum=0)
        self._check_int("fused_width", optional=True)
        self._check_bool("train_mode", "activation_aware")
        for name in ("fusion", "decomposition", "split"):
            self._check_str(name)
        self._check_str("text_column", optional=True)
        self._check_str("dataset_config", optional=True)
        self._check_choice("fisher_labels", LABEL_MODE_NAMES)
        problem = corpus_problem(self.calibration)
        if problem:  # a recipe's list of lists would fail only once the source is loaded
            raise ValueError(f"unite config: calibration {problem}; give a corpus name, a text file, a Hub dataset id "
                             "or a list of strings")
        check_tucker_rank(self, per_axis=True)
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
                raise ValueError(f"unite config: budget must be a fraction in (0, 1], got {self.budget!r}")
            if self.rank is not None or self.fused_width is not None:
                raise ValueError("unite config: budget picks rank and fused_width; give the budget or them, not both")
        if self.fused_width is not None and self.fusion in FUSION_NAMES and self.fusion not in VARIABLE_WIDTH_FUSIONS:
            raise ValueError(f"unite config: fused_width applies only to fusion 'concat' (fusion {self.fusion!r} keeps "
                             "the experts' width); drop fused_width or use fusion='concat'")
