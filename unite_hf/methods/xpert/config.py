"""XPERT's settings (torch-free: the CLI generates ``unite-hf extract --method xpert`` options from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, check_tucker_rank, corpus_problem, option, parse_rank

DEFAULT_DOMAINS: tuple[str, ...] = ("wikitext2", "simplebooks", "openbookqa", "arc_easy", "sst2")
"""The routing analysis's default domains: general text, simple books, science QA, science questions,
movie-review sentences (``unite_hf.methods.xpert.analysis.DEFAULT_DOMAINS`` is this)."""
COMMONALITY_SCORE_NAMES = ["min_frequency", "min_router_mass", "top_m_fraction"]
"""The built-in commonality scores (``unite_hf.methods.xpert.analysis.COMMONALITY_SCORES``)."""
SELECTION_STRATEGY_NAMES = ["common", "least", "random"]
"""``unite_hf.methods.xpert.analysis.SELECTION_STRATEGIES``."""


def parse_domain(value: str) -> tuple[str, str]:
    """``NAME=CORPUS`` -> ``(NAME, CORPUS)``; a bare built-in ``NAME`` -> ``(NAME, NAME)``."""
    name, sep, corpus = value.partition("=")
    if not name or (sep and not corpus):
        raise ValueError(f"expected NAME=CORPUS or a built-in NAME, got {value!r}")
    return name, corpus if sep else name


@dataclass
class XpertExtractionConfig(MethodConfig):
    """How :func:`~unite_hf.extract_xpert_gene` builds an XPERT gene: the routing analysis over the
    domains (skipped when a saved analysis is given), the expert selection and the Tucker consolidation."""

    method = "xpert"
    cli_inputs = {"analysis": {"flag": "--analysis", "metavar": "DIR",
                               "help": "reuse a saved analyze-experts folder (skips the routing analysis)"}}

    domains: Any = option(DEFAULT_DOMAINS, parse=parse_domain, flag="--domain", action="append", metavar="NAME=CORPUS",
                          help="domains of the routing analysis: NAME=<text file | Hub dataset id | wikitext2 | "
                               "simplebooks | built-in>, or a built-in NAME (repeat the option for each domain)")
    num_sequences: int = option(32, help="sequences per domain in the routing analysis")
    seq_len: int = option(256, help="tokens per sequence of the routing analysis")
    seed: int = option(0, help="seed of the sequences drawn from each domain (and of strategy random)")
    batch_size: int = option(4, help="sequences per forward pass of the routing analysis")
    score: str = option("min_frequency", choices=COMMONALITY_SCORE_NAMES,
                        help="commonality score that ranks experts across domains")
    k: int | None = option(None, flag="--k-common",
                           help="experts per layer to consolidate (default: the analysis's k_common, else the most any "
                                "layer keeps)")
    strategy: str = option("common", choices=SELECTION_STRATEGY_NAMES, help="common (XPERT) or the controls random / least")
    rank: int | tuple[int, int, int] | None = option(None, parse=parse_rank, metavar="R",
                                                     help="Tucker rank of the stacked (L*k, out, in) experts: r or "
                                                          "r_E,r_out,r_in (default: 512, clipped)")
    n_iter_max: int = option(25, help="HOOI iterations")

    def __post_init__(self) -> None:
        for name in ("num_sequences", "seq_len", "batch_size", "n_iter_max"):
            self._check_int(name)
        self._check_int("seed", minimum=0)
        self._check_int("k", optional=True)
        self._check_str("score")
        self._check_choice("strategy", SELECTION_STRATEGY_NAMES)
        check_tucker_rank(self)
        if isinstance(self.domains, (list, tuple)) and self.domains and all(
                isinstance(d, (list, tuple)) and len(d) == 2 for d in self.domains):
            self.domains = {name: corpus for name, corpus in self.domains}  # the CLI's NAME=CORPUS pairs
        elif isinstance(self.domains, list):
            self.domains = tuple(self.domains)
        if self.domains is not None and not len(self.domains):  # None: given in Python, not recorded in a recipe
            raise ValueError("xpert config: domains must name at least one domain")
        corpora = self.domains.items() if isinstance(self.domains, dict) else ()
        problem = next((f"{name!r} {p}" for name, p in ((n, corpus_problem(c)) for n, c in corpora) if p), None)
        if problem:  # a recipe's list of numbers would fail only once the source is loaded
            raise ValueError(f"xpert config: domain {problem}; a domain's corpus is a name, a text file, a Hub dataset "
                             "id or a list of strings")
