"""The registry of the methods: one :class:`Method` record per method, the one list everything else reads.

The entry point (``LIGHTNING_INTERP_CALLBACKS`` names), the report's introductions, the audit (its sections and
the report keys of a config's callbacks) and the demo's parts all iterate :data:`METHODS`, so a sixth method is
one more line here (docs/development.md, "Adding a method").

A record names its callback and its ``measure_<key>`` function by dotted path and imports them on first access:
``import lightning_interp.methods`` imports neither torch, Lightning, captum nor matplotlib, so ``lightning-interp
--help`` stays fast.

Example:
    >>> [m.key for m in METHODS]
    ['posterior_gap', 'saliency', 'ablation', 'correlation', 'expansion']
    >>> find("ablation").callback_name
    'AblationProbeCallback'
    >>> find("posterior_gap").part
    'posterior'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METHODS", "Method", "find", "for_callback", "keys"]


def _resolve(path: str) -> Any:
    """The object ``module:name`` names, imported now."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        raise AttributeError(
            f"{path!r} (a record of lightning_interp.methods.METHODS): module {module} has no {name}; define it there "
            "or correct the record's path"
        ) from None


@dataclass(frozen=True)
class Method:
    """One interpretability method: what the report, the audit, the demo and the entry point need to know of it.

    Attributes:
        key: the callback's ``prefix`` (the logged keys are ``<key>/...``) and the bare name of
            ``LIGHTNING_INTERP_CALLBACKS``.
        title: the heading of the method's report section.
        paper: the reference, exactly as docs/ and METHODS.md cite it: authors (year). "Title." venue.
        intro: what the method's numbers mean and how to read its figures (the report shows it above them).
        callback_path: ``module:ClassName`` of the Lightning callback.
        measure_path: ``module:measure_<key>`` of the entry function the callback calls.
        part: the short name of the demo's part (its ``--parts`` choice and ``summary.json`` key) and of the
            method's key in an audit's ``report.json``; the key unless given.
        audit_sections: the sections an image-folder audit writes for this method, in report order (empty: the
            method needs what only a config gives, e.g. a generative task or categorical inputs).
        example_arguments: sample values of the callback's required arguments, shown in the JSON form of
            ``LIGHTNING_INTERP_CALLBACKS`` error messages.
    """

    key: str
    title: str
    paper: str
    intro: str
    callback_path: str
    measure_path: str
    part: str = ""
    audit_sections: tuple[str, ...] = ()
    example_arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.part:  # frozen: set through object.__setattr__, once, at construction
            object.__setattr__(self, "part", self.key)

    @property
    def callback_name(self) -> str:
        """The callback's class name (without importing it)."""
        return self.callback_path.partition(":")[2]

    @property
    def callback(self) -> type:
        """The callback class (imports Lightning on first access)."""
        return _resolve(self.callback_path)

    @property
    def measure(self) -> Callable[..., Any]:
        """The entry function ``measure_<key>(model, inputs, labels=None, *, generator=None, **settings)``."""
        return _resolve(self.measure_path)


#: The methods, in the order reports, the demo and ``--help`` list them.
METHODS: tuple[Method, ...] = (
    Method(
        key="posterior_gap",
        title="Posterior gap",
        paper='Yudi Xie (2025). "How do we interpret the outputs of a neural network trained on classification?" '
        "ICLR 2025 Blogposts Track.",
        intro="The posterior gap (Xie, 2025) compares the network's class probabilities with the exact Bayes posterior "
        "of the data's generative model. KL divergence and total variation near zero mean the network computes the "
        "Bayes-optimal answer; the error bars are standard errors over the probe examples.",
        callback_path="lightning_interp.callbacks:PosteriorGapCallback",
        measure_path="lightning_interp.posterior:measure_posterior_gap",
        part="posterior",
    ),
    Method(
        key="saliency",
        title="Final-layer saliency",
        paper='Siddhartha (2022). "An interpretation of the final fully connected layer." arXiv 2205.11908.',
        intro="Final-layer saliency (Siddhartha, 2022) splits the last layer's weights into the channels that speak "
        "for the predicted class (discriminative map) and against it (confusing map), and shows where in the image "
        "they fire; the policy-gradient map is positive (red) where the image supports the prediction and negative "
        "(blue) where it supports the competitors. A faithfulness above zero means that deleting the pixels a map "
        "ranks first lowers the class probability faster than deleting random pixels; neg_pg_share is the share of "
        "evidence that speaks for other classes.",
        callback_path="lightning_interp.callbacks:FinalLayerSaliencyCallback",
        measure_path="lightning_interp.saliency:measure_saliency",
        audit_sections=("saliency", "weights"),
    ),
    Method(
        key="ablation",
        title="Bayesian ablation",
        paper='Nam, Campbell, Griffiths, Cohen, Leslie (2025). "Understanding Task Representations in Neural Networks '
        'via Bayesian Ablation." arXiv 2505.13742 (CogSci 2025).',
        intro="Bayesian ablation (Nam et al., 2025) asks which units of a layer each class task needs: a unit's "
        "importance is the posterior probability that it must stay on for the network to keep solving the task, "
        "against a prior shown as a dashed line. Bars are two standard errors; distributedness near 1 means a task is "
        "spread over many units, and manifold complexity counts the bits the units' ablation masks share.",
        callback_path="lightning_interp.callbacks:AblationProbeCallback",
        measure_path="lightning_interp.ablation:measure_ablation",
        audit_sections=("ablation",),
        example_arguments={"layers": ["net.1"]},
    ),
    Method(
        key="correlation",
        title="Correlation orders",
        paper='Fischer, René, Keup, Layer, Dahmen, Helias (2022). "Decomposing neural networks as mappings of '
        'correlation functions." Physical Review Research 4, 043143.',
        intro="Correlation orders (Fischer et al., 2022) replace a layer's input by surrogate data that keep only its "
        "class means (order 1) or means and covariances (order 2), and measure the accuracy the rest of the network "
        "reaches. A small gap between the order-2 accuracy and the real accuracy means the layer uses no more than "
        "second-order statistics of its input; error bars are standard errors over the probe and the surrogate draws.",
        callback_path="lightning_interp.callbacks:CorrelationOrderCallback",
        measure_path="lightning_interp.correlation:measure_correlation",
        audit_sections=("correlation",),
    ),
    Method(
        key="expansion",
        title="Energy expansion",
        paper='Stefano Zamuner, Paolo De Los Rios (2021). "Interpretability of neural networks classifiers with '
        'categorical inputs." arXiv 2102.03202.',
        intro="The energy expansion (Zamuner & De Los Rios, 2021) writes the output of a network on categorical inputs "
        "as fields (one per position and state) plus pairwise couplings plus a residual. The variance shares say how "
        "much of the output each order explains; the coupling map shows which pairs of positions interact.",
        callback_path="lightning_interp.callbacks:LogitExpansionCallback",
        measure_path="lightning_interp.expansion:measure_expansion",
        example_arguments={"seq_len": 8, "num_states": 4},
    ),
)


def keys() -> list[str]:
    """The keys of :data:`METHODS`, in order."""
    return [m.key for m in METHODS]


def find(name: str) -> Method:
    """The record whose key, part or callback class name is ``name``.

    Raises:
        ValueError: no record has that name (the message lists the keys).
    """
    for m in METHODS:
        if name in (m.key, m.part, m.callback_name):
            return m
    raise ValueError(f"unknown method {name!r}; the methods (lightning_interp.methods.METHODS) are {', '.join(keys())}")


def for_callback(callback: Any) -> Method | None:
    """The record of a callback (an instance or a class; subclasses too), ``None`` when no record names it.

    Matched by class name along the class's MRO, so nothing is imported.
    """
    cls = callback if isinstance(callback, type) else type(callback)
    names = [c.__name__ for c in cls.__mro__]
    for name in names:
        for m in METHODS:
            if m.callback_name == name:
                return m
    return None
