"""Checkers of the notebooks' code exercises: a student's function against pfl's reference.

Each checker runs the student's function on a few fixed cases (float64, seeded), compares the
result with what ``pfl`` computes for the same inputs and prints one verdict:

* ``not attempted yet`` when the function returns None (the stub as handed out);
* ``case '<name>' failed: ...`` naming the first failing case and how: the shape, or the
  worst value with the expected and the obtained number (and a hint for a common slip);
* ``correct`` when every case matches.

>>> check_gaussian_kl(lambda mu, std: None)
gaussian_kl: not attempted yet (the function returns None: fill in its body)
>>> check_gaussian_kl(lambda mu, std: 0.5 * (std**2 + mu**2 - 1 - 2 * std.log()).sum(-1))
gaussian_kl: correct (4 cases match pfl.method.flows.gaussian_kl_to_std_normal)

The exercises that call them are in ``notebooks/exercises.json`` (and at the end of notebook
03b); the answers in ``notebooks/solutions/``; docs/coursework.md explains the workflow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from pfl.method.flows import gaussian_kl_to_std_normal, invertible_u, planar_step
from pfl.method.losses import dice_loss, focal_loss
from pfl.method.maps import mean_sigmoid_reference, sample_std_reference

NOT_ATTEMPTED, FAILED, CORRECT = "not attempted", "failed", "correct"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ``status`` (``"not attempted"``, ``"failed"``,
    ``"correct"``) and the ``message`` printed for the student."""

    status: str
    message: str

    def __bool__(self) -> bool:
        return self.status == CORRECT

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Case:
    """One fixed input: ``args`` for the student's function and pfl's ``expected`` output
    (a tensor, or a tuple of tensors for a function that returns several)."""

    name: str
    args: tuple
    expected: Tensor | tuple[Tensor, ...]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _compare(got, expected: Tensor, atol: float, rtol: float, what: str) -> str | None:
    """None when ``got`` matches ``expected``, else what is wrong, in words."""
    if got is None:
        return f"{what}returned None"
    try:
        got = torch.as_tensor(got.detach() if isinstance(got, Tensor) else got,
                              dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return f"{what}returned a {type(got).__name__}, expected a tensor"
    if tuple(got.shape) != tuple(expected.shape):
        return f"{what}shape: expected {tuple(expected.shape)}, got {tuple(got.shape)}"
    if not bool(torch.isfinite(got).all()):
        return f"{what}value: the result holds NaN or inf"
    err = (got - expected).abs()
    excess = err - (atol + rtol * expected.abs())
    if bool((excess <= 0).all()):
        return None
    idx = int(excess.flatten().argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), expected.shape)) \
        if expected.dim() else ()
    at = f" at index {where}" if where else ""
    return (f"{what}value{at}: expected {_fmt(float(expected.flatten()[idx]))}, "
            f"got {_fmt(float(got.flatten()[idx]))} (|difference| {_fmt(float(err.max()))}, "
            f"tolerance {_fmt(atol)} + {_fmt(rtol)} x |expected|)")


class Checker:
    """A checker for one exercise: ``checker(fn)`` prints the verdict, ``checker.verdict(fn)``
    returns it (:class:`Verdict`).

    Args:
        name: the exercise's function name, as the student's stub names it.
        reference: what the expected values come from (named in the verdict).
        make_cases: builds the fixed cases (called once, lazily).
        atol, rtol: tolerance of the comparison (float64 inputs).
        hint: added to a failure message (a common slip and how to spot it).
    """

    def __init__(self, name: str, reference: str, make_cases: Callable[[], list[Case]],
                 atol: float = 1e-8, rtol: float = 1e-6, hint: str = ""):
        self.name, self.reference, self._make_cases = name, reference, make_cases
        self.atol, self.rtol, self.hint = atol, rtol, hint

    @cached_property
    def cases(self) -> list[Case]:
        return self._make_cases()

    def verdict(self, fn: Callable) -> Verdict:
        """Run ``fn`` on every case (on copies of the inputs) and judge the results."""
        for i, case in enumerate(self.cases):
            args = tuple(a.clone() if isinstance(a, Tensor) else a for a in case.args)
            try:
                got = fn(*args)
            except Exception as exc:  # the student's bug, reported, not raised
                return self._failed(case, f"raised {type(exc).__name__}: {exc}")
            if got is None and i == 0:
                return Verdict(NOT_ATTEMPTED, f"{self.name}: not attempted yet (the function "
                                              "returns None: fill in its body)")
            problem = self._check(got, case.expected)
            if problem:
                return self._failed(case, problem)
        return Verdict(CORRECT, f"{self.name}: correct ({len(self.cases)} cases match "
                                f"{self.reference})")

    def _check(self, got, expected) -> str | None:
        if not isinstance(expected, tuple):
            return _compare(got, expected, self.atol, self.rtol, "")
        if not isinstance(got, Sequence) or isinstance(got, Tensor) or len(got) != len(expected):
            return f"expected a tuple of {len(expected)} tensors, got {type(got).__name__}"
        for k, (g, e) in enumerate(zip(got, expected)):
            problem = _compare(g, e, self.atol, self.rtol, f"output {k}: ")
            if problem:
                return problem
        return None

    def _failed(self, case: Case, problem: str) -> Verdict:
        hint = f"\n  hint: {self.hint}" if self.hint else ""
        return Verdict(FAILED, f"{self.name}: case '{case.name}' failed: {problem}{hint}")

    def __call__(self, fn: Callable) -> None:
        print(self.verdict(fn).message)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --- notebook 03: the planar step ------------------------------------------------------------

def _planar_cases() -> list[Case]:
    g = _gen(0)
    cases = []
    z, u, w = _randn(3, g=g), _randn(3, g=g), _randn(3, g=g)
    cases.append(("one point, D = 3", (z, u, w, torch.tensor(0.3, dtype=torch.float64))))
    cases.append(("u = 0: the identity", (z, torch.zeros(3, dtype=torch.float64), w,
                                          torch.tensor(-0.2, dtype=torch.float64))))
    w2 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    u2 = -3.0 * w2 / (w2 @ w2)  # w^T u = -3: 1 + u^T psi < 0 near the hyperplane
    cases.append(("w^T u = -3, a negative determinant", (torch.tensor([0.1, -0.2],
                                                                      dtype=torch.float64),
                                                         u2, w2, torch.tensor(0.0,
                                                                              dtype=torch.float64))))
    cases.append(("a batch of 5 points, D = 4", (_randn(5, 4, g=g), _randn(4, g=g),
                                                 _randn(4, g=g),
                                                 torch.tensor(0.7, dtype=torch.float64))))
    return [Case(n, a, planar_step(*a)[1]) for n, a in cases]


check_planar_logdet = Checker(
    "planar_logdet", "pfl.method.flows.planar_step", _planar_cases,
    hint="log|det| = log|1 + u^T psi|, psi = (1 - tanh^2(w^T z + b)) w; the absolute value "
         "matters when w^T u < -1, and the sums run over the last dim only",
)


def _u_hat_cases() -> list[Case]:
    g = _gen(1)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    cases = [
        ("w^T u = -3 (not invertible)", (-3.0 * w / (w @ w), w)),
        ("w^T u = 2 (moved as well)", (2.0 * w / (w @ w) + torch.tensor([0.5, -1.0],
                                                                      dtype=torch.float64), w)),
        ("w^T u = 0", (torch.tensor([0.5, -1.0], dtype=torch.float64), w)),
        ("a batch of 4, D = 5", (_randn(4, 5, g=g), _randn(4, 5, g=g))),
    ]
    return [Case(n, a, invertible_u(*a)) for n, a in cases]


check_u_hat = Checker(
    "u_hat", "pfl.method.flows.invertible_u", _u_hat_cases,
    hint="u_hat = u + (m(w^T u) - w^T u) w / ||w||^2 with m(x) = -1 + log(1 + e^x) "
         "(torch.nn.functional.softplus); keep the last dim with keepdim=True",
)


# --- notebook 04: Eq. A.5 ------------------------------------------------------------------

def _kl_cases() -> list[Case]:
    g = _gen(2)
    cases = [
        ("q0 = N(0, I): KL 0", (torch.zeros(4, dtype=torch.float64),
                                torch.ones(4, dtype=torch.float64))),
        ("one Gaussian, D = 3", (_randn(3, g=g), torch.rand(3, generator=g,
                                                            dtype=torch.float64) + 0.3)),
        ("sigma = 0.02 in D = 64 (the model's init)", (torch.zeros(64, dtype=torch.float64),
                                                       torch.full((64,), 0.02,
                                                                  dtype=torch.float64))),
        ("a batch of 3, D = 4", (_randn(3, 4, g=g), torch.rand(3, 4, generator=g,
                                                               dtype=torch.float64) + 0.1)),
    ]
    return [Case(n, a, gaussian_kl_to_std_normal(*a)) for n, a in cases]


check_gaussian_kl = Checker(
    "gaussian_kl", "pfl.method.flows.gaussian_kl_to_std_normal", _kl_cases,
    hint="0.5 * sum(std^2 + mu^2 - 1 - 2 log std) over the last dim: the argument is the "
         "standard deviation, not the variance",
)


# --- notebook 05: Eq. A.3 and A.4 ------------------------------------------------------------

def _mask_cases(seed: int) -> list[tuple[str, Tensor, Tensor]]:
    g = _gen(seed)
    y = torch.zeros(2, 6, 6, dtype=torch.float64)
    y[0, 1:3, 2:5] = 1.0
    p = torch.rand(2, 6, 6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return [
        ("all 0.5, a square defect", torch.full((1, 4, 4), 0.5, dtype=torch.float64),
         (torch.arange(16, dtype=torch.float64).view(1, 4, 4) < 6).double()),
        ("two images, one without defect", p, y),
        ("a perfect prediction", y.clone().clamp(0.02, 0.98), y),
    ]


def _focal_cases() -> list[Case]:
    cases = [Case(f"{n}, gamma = 2", (p, y, 2.0), focal_loss(p, y, 2.0))
             for n, p, y in _mask_cases(3)]
    n, p, y = _mask_cases(3)[1]
    cases.append(Case(f"{n}, gamma = 0 (cross-entropy)", (p, y, 0.0), focal_loss(p, y, 0.0)))
    return cases


check_focal_loss = Checker(
    "focal_loss", "pfl.method.losses.focal_loss", _focal_cases,
    hint="p_i is the probability of the *correct* class: prob where the mask is 1, "
         "1 - prob where it is 0; the mean runs over every pixel of the batch",
)


def _dice_cases() -> list[Case]:
    cases = [Case(f"{n}, smooth = 1", (p, y, 1.0), dice_loss(p, y, 1.0))
             for n, p, y in _mask_cases(4)]
    n, p, y = _mask_cases(4)[0]
    cases.append(Case(f"{n}, smooth = 0 (Eq. A.4 as printed)", (p, y, 0.0),
                      dice_loss(p, y, 0.0)))
    return cases


check_dice_loss = Checker(
    "dice_loss", "pfl.method.losses.dice_loss", _dice_cases,
    hint="one dice value per image (sums over the H x W pixels), then the mean over images; "
         "smooth is added to the numerator 2 sum(y p) and to the denominator",
)


# --- notebook 03b: the Monte Carlo mean map and its spread --------------------------------

def _mc_cases() -> list[Case]:
    g = _gen(5)
    cases = []
    for name, R in (("R = 1 (no spread)", 1), ("R = 2", 2), ("R = 10", 10)):
        p = torch.rand(R, 4, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05
        cases.append((name, p))
    cases.append(("R = 3, all samples equal", torch.full((3, 2, 2), 0.3, dtype=torch.float64)))
    out = []
    for name, p in cases:
        R, H, W = p.shape
        diff = torch.logit(p).view(1, 1, R, H, W)  # one layer, one bank prompt, R samples
        mean = mean_sigmoid_reference(diff, (H, W))[0, 0]
        std = sample_std_reference(diff, (H, W), n_samples=R)[0]
        out.append(Case(name, (p,), (mean, std)))
    return out


check_mc_mean_std = Checker(
    "mc_mean_std", "pfl.method.maps (mean_sigmoid_reference, sample_std_reference)", _mc_cases,
    hint="average over the sample dim 0; pfl's std divides by R (population form, "
         "correction=0), so R = 1 gives 0",
)

CHECKERS: dict[str, Checker] = {c.name: c for c in (
    check_planar_logdet, check_u_hat, check_gaussian_kl, check_focal_loss, check_dice_loss,
    check_mc_mean_std)}
