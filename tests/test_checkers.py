"""The exercise checkers: a right answer passes, a wrong one is reported, the stub is "not
attempted yet" (pfl.teach.checkers)."""

import pytest
import torch
import torch.nn.functional as F

from pfl.teach import checkers as C


def planar_logdet(z, u, w, b):
    h = torch.tanh((w * z).sum(-1) + b)
    return torch.log(torch.abs(1 + (1 - h**2) * (w * u).sum(-1)))


def planar_logdet_no_abs(z, u, w, b):  # the classic slip: log of a negative determinant
    h = torch.tanh((w * z).sum(-1) + b)
    return torch.log(1 + (1 - h**2) * (w * u).sum(-1))


def u_hat(u, w):
    wu = (w * u).sum(-1, keepdim=True)
    return u + (F.softplus(wu) - 1 - wu) * w / (w * w).sum(-1, keepdim=True)


def u_hat_no_keepdim(u, w):
    wu = (w * u).sum(-1)
    return u + (F.softplus(wu) - 1 - wu) * w / (w * w).sum(-1)


def gaussian_kl(mu, std):
    return 0.5 * (std**2 + mu**2 - 1 - 2 * torch.log(std)).sum(-1)


def gaussian_kl_variance_slip(mu, std):  # treats std as the variance
    return 0.5 * (std + mu**2 - 1 - torch.log(std)).sum(-1)


def focal(prob, target, gamma):
    p = torch.where(target > 0.5, prob, 1 - prob)
    return -((1 - p) ** gamma * torch.log(p)).mean()


def focal_wrong_class(prob, target, gamma):  # uses the abnormal probability everywhere
    return -((1 - prob) ** gamma * torch.log(prob)).mean()


def dice(prob, target, smooth):
    inter = (prob * target).sum((-2, -1))
    return (1 - (2 * inter + smooth) / (prob.sum((-2, -1)) + target.sum((-2, -1)) + smooth)).mean()


def dice_pooled(prob, target, smooth):  # one dice over the whole batch
    return 1 - (2 * (prob * target).sum() + smooth) / (prob.sum() + target.sum() + smooth)


def mc_mean_std(maps):
    return maps.mean(0), maps.std(0, correction=0)


def mc_mean_std_unbiased(maps):
    return maps.mean(0), maps.std(0)


CASES = {  # checker name -> (right answer, wrong answer, words the failure must contain)
    "planar_logdet": (planar_logdet, planar_logdet_no_abs, "negative determinant"),
    "u_hat": (u_hat, u_hat_no_keepdim, "a batch of 4"),
    "gaussian_kl": (gaussian_kl, gaussian_kl_variance_slip, "value"),
    "focal_loss": (focal, focal_wrong_class, "value"),
    "dice_loss": (dice, dice_pooled, "two images, one without defect"),
    "mc_mean_std": (mc_mean_std, mc_mean_std_unbiased, "output 1"),
}


def test_every_checker_is_exercised_here():
    assert set(CASES) == set(C.CHECKERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_right_answer_is_correct(name, capsys):
    right = CASES[name][0]
    v = C.CHECKERS[name].verdict(right)
    assert v.status == C.CORRECT and bool(v), v.message
    C.CHECKERS[name](right)
    assert capsys.readouterr().out.strip().endswith(
        f"cases match {C.CHECKERS[name].reference})")


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # the unbiased std of one sample is NaN
@pytest.mark.parametrize("name", sorted(CASES))
def test_wrong_answer_names_the_case_and_the_problem(name, capsys):
    _, wrong, words = CASES[name]
    v = C.CHECKERS[name].verdict(wrong)
    assert v.status == C.FAILED and not v
    assert v.message.startswith(f"{name}: case '") and words in v.message, v.message
    C.CHECKERS[name](wrong)
    assert "failed" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CASES))
def test_stub_is_not_attempted(name, capsys):
    C.CHECKERS[name](lambda *args: None)
    assert capsys.readouterr().out == f"{name}: not attempted yet (the function returns None: " \
                                      "fill in its body)\n"


def test_failure_reports_expected_and_got():
    v = C.check_gaussian_kl.verdict(lambda mu, std: gaussian_kl(mu, std) + 0.5)
    assert "case 'q0 = N(0, I): KL 0' failed: value: expected 0, got 0.5" in v.message
    assert "hint:" in v.message


def test_shape_exceptions_and_odd_returns_are_reported_not_raised():
    v = C.check_u_hat.verdict(lambda u, w: u.sum())
    assert "shape: expected (2,), got ()" in v.message
    v = C.check_u_hat.verdict(lambda u, w: 1 / 0)
    assert "raised ZeroDivisionError" in v.message
    v = C.check_mc_mean_std.verdict(lambda maps: maps.mean(0))
    assert "expected a tuple of 2 tensors" in v.message
    v = C.check_gaussian_kl.verdict(lambda mu, std: "zero")
    assert v.status == C.FAILED and "returned a str" in v.message
    v = C.check_gaussian_kl.verdict(lambda mu, std: torch.full(mu.shape[:-1], float("nan")))
    assert "NaN or inf" in v.message


def test_none_after_the_first_case_is_a_failure_not_a_stub():
    calls = []

    def half_done(mu, std):
        calls.append(1)
        return gaussian_kl(mu, std) if len(calls) == 1 else None

    v = C.check_gaussian_kl.verdict(half_done)
    assert v.status == C.FAILED and "returned None" in v.message


def test_inputs_are_copies():
    def in_place(mu, std):
        out = gaussian_kl(mu, std)
        mu.add_(1.0)
        return out

    assert C.check_gaussian_kl.verdict(in_place)
    assert C.check_gaussian_kl.verdict(gaussian_kl)  # the cases were not changed


def test_mc_reference_is_the_plain_mean_and_population_std():
    # The checker's expected values come from pfl.method.maps; here from first principles.
    for case in C.check_mc_mean_std.cases:
        (maps,) = case.args
        mean, std = case.expected
        torch.testing.assert_close(mean, maps.mean(0))
        torch.testing.assert_close(std, maps.std(0, correction=0))


def test_exercise_cells_run_as_handed_out(capsys):
    """notebooks/exercises.json: every code cell is self-contained, calls one checker and, run
    as is, prints "not attempted yet"; every notebook it names exists."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "notebooks"
    exercises = json.loads((folder / "exercises.json").read_text(encoding="utf-8"))
    called = set()
    for notebook, cells in exercises.items():
        assert (folder / notebook).is_file(), notebook
        assert cells and cells[0]["cell_type"] == "markdown"
        assert cells[0]["source"].startswith("## Exercises")
        for cell in cells:
            assert cell["cell_type"] in ("markdown", "code")
            if cell["cell_type"] == "code":
                exec(compile(cell["source"], notebook, "exec"), {})
                out = capsys.readouterr().out
                assert out.endswith("not attempted yet (the function returns None: fill in its "
                                    "body)\n"), out
                called.add(out.split(":")[0])
    assert called == set(C.CHECKERS) - {"mc_mean_std"}  # that one is in notebook 03b itself
