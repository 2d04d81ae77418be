import torch

import learnsteps as ls
from learnsteps.core.schedules import EDM, DiscreteDDPM, VPLinear
from learnsteps.teachers.gmm import digits_data, gaussian, gmm_digits, toy_mixture

F64 = torch.float64


def tweedie_x0(teacher, x, t):
    """E[x0 | x_t] = (x + sigma^2 grad log p_t(x)) / alpha, from the closed-form marginal density."""
    x = x.detach().requires_grad_()
    score, = torch.autograd.grad(teacher.log_prob(x, t).sum(), x)
    s = teacher.noise_schedule
    return (x + s.sigma(t) ** 2 * score) / s.alpha(t)


def test_mixture_denoiser_is_the_posterior_mean():
    for schedule in (VPLinear(), EDM(), DiscreteDDPM()):
        teacher = toy_mixture(noise_schedule=schedule)
        g = torch.Generator().manual_seed(0)
        for t in torch.linspace(schedule.t_max, schedule.t_min, 5, dtype=F64):
            x = teacher.sample_data(16, g) * schedule.alpha(t) + schedule.sigma(t) * torch.randn(16, 6, generator=g,
                                                                                               dtype=F64)
            torch.testing.assert_close(teacher.x0(x, t), tweedie_x0(teacher, x, t), rtol=1e-9, atol=1e-9)


def test_digits_mixture_denoiser_is_the_posterior_mean_on_images():
    teacher = gmm_digits()
    x = torch.randn(4, 1, 8, 8, dtype=F64)
    t = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=F64)
    x0 = teacher.x0(x, t)
    assert x0.shape == (4, 1, 8, 8)
    for i in range(4):
        torch.testing.assert_close(x0[i:i + 1], tweedie_x0(teacher, x[i:i + 1], t[i]), rtol=1e-8, atol=1e-8)


def test_denoiser_at_sigma_zero_returns_the_data():
    teacher = toy_mixture()
    x = teacher.sample_data(8)
    torch.testing.assert_close(teacher.x0(x, torch.zeros((), dtype=F64)), x)


def test_digits_mixture_resembles_the_data():
    data = digits_data().reshape(-1, 64)
    teacher = gmm_digits()
    samples = teacher.sample_data(20000, torch.Generator().manual_seed(0)).reshape(-1, 64)
    assert (samples.mean(0) - data.mean(0)).abs().max() < 0.03
    assert (samples.T.cov() - data.T.cov()).abs().max() < 0.05
    assert teacher.fingerprint() == gmm_digits().fingerprint()
    assert teacher.fingerprint() != gmm_digits(EDM()).fingerprint()


def test_exact_flow_of_a_gaussian_matches_the_reference_solver():
    teacher = gaussian(8)
    x_T = torch.randn(16, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    times = torch.tensor([1.0, 0.5, 0.1, 1e-3], dtype=F64)
    ref = ls.reference_solve(teacher, x_T, times, rtol=1e-11, atol=1e-11)
    for i, t in enumerate(times):
        torch.testing.assert_close(ref.trajectory[i], teacher.exact_flow(x_T, times[0], t), rtol=0, atol=1e-8)
    # the estimate (summed local errors of x / alpha) bounds the actual error and is small
    actual = float((ref.x - teacher.exact_flow(x_T, times[0], times[-1])).pow(2).mean().sqrt())
    assert actual <= ref.error_estimate < 1e-6
    assert ref.nfe == 1 + 6 * (ref.steps + ref.rejected)  # first slope, then 6 stages per attempt (FSAL)


def test_reference_error_shrinks_with_the_tolerance():
    teacher = gaussian(8)
    x_T = torch.randn(8, 8, dtype=F64)
    times = torch.tensor([1.0, 1e-3], dtype=F64)
    exact = teacher.exact_flow(x_T, times[0], times[1])
    errors = [float((ls.reference_solve(teacher, x_T, times, rtol=tol, atol=tol).x - exact).abs().max())
              for tol in (1e-5, 1e-8, 1e-11)]
    assert errors[0] > 30 * errors[1] > 30 * 30 * errors[2]
