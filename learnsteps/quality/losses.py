"""Per-sample distances between student and teacher samples."""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("l2", "l1", "pseudo_huber", "lpips", "features", "spread", "contraction", "feature_contraction", "data_mmd",
          "class_mmd")
PIXEL_LOSSES = ("lpips", "features", "contraction", "feature_contraction", "data_mmd", "class_mmd")  # on images


def pixel_space(teacher, loss: str = "lpips") -> dict:
    """For a latent teacher (one with `decode`) and a loss with a pixel term, what `distance` needs to compute it on
    the teacher's images: the decoder and the image shape ((C, F, H, W) for video); {} for a teacher that samples
    images directly, or a loss that stays in latent space (the VAE is then never run)."""
    decode = getattr(teacher, "decode", None)
    if decode is None or not {split_term(t)[1] for t in str(loss).split("+")} & set(PIXEL_LOSSES):
        return {}
    with torch.no_grad():
        image = decode(torch.zeros(1, *teacher.shape))
    return dict(decode=decode, image_shape=tuple(image.shape[1:]))


def check_loss_name(name) -> str | None:
    """A config rule: one of LOSSES, or several joined by "+", each with an optional positive factor
    (e.g. "l2+features", "l2+10*contraction")."""
    terms = [split_term(p) for p in name.split("+")] if isinstance(name, str) else [(1.0, None)]
    names = [n for _, n in terms]
    ok = (all(n in LOSSES and f > 0 and math.isfinite(f) for f, n in terms) and len(set(names)) == len(names)
          and (len(terms) > 1 or terms[0][0] == 1.0))
    return None if ok else (f"must be one of {', '.join(LOSSES)}, or several joined by '+', each with an optional "
                            f"positive factor (e.g. 'l2+features', 'l2+10*contraction')")


class Sum:
    """Several distances added, each weighted by its factor (`3*features`: 3; default 1) over its mean on a
    calibration set (`calibrate`, e.g. the candidate grids' validation outputs), so that every term starts at its
    factor whatever its units (features are ~20x l2 here). A term without units (`contraction`, a squared
    log-ratio that a good start may already have near zero) is weighted by its factor alone."""

    def __init__(self, parts: dict, factors: dict | None = None):
        self.parts = parts
        self.factors = factors or {k: 1.0 for k in parts}
        self.weights = dict(self.factors)

    @torch.no_grad()
    def calibrate(self, outputs: list[Tensor], y: Tensor) -> None:
        """outputs: each candidate's samples of the same targets y, scored apart (a batch term such as
        `contraction` compares a sample with its neighbours among y, which must not be another candidate's)."""
        self.weights = {k: self.factors[k] if getattr(d, "scale_free", False) else
                        self.factors[k] / max(sum(float(d(x, y).mean()) for x in outputs) / len(outputs), 1e-12)
                        for k, d in self.parts.items()}

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return sum(self.weights[k] * d(x, y) for k, d in self.parts.items())


def split_term(term: str) -> tuple[float, str]:
    """"3*contraction" -> (3.0, "contraction"); "l2" -> (1.0, "l2")."""
    factor, _, name = term.rpartition("*")
    try:
        return (float(factor) if factor else 1.0), name
    except ValueError:
        return math.nan, term


def distance(name: str, shape: tuple[int, ...] | None = None, feature_net: str = "", decode=None,
             image_shape: tuple[int, ...] | None = None, reference: str = ""):
    """A function (x, y) -> (B,) distances between samples of `shape` (checked now when given). l2: mean squared
    error; l1: mean absolute error; pseudo_huber: sqrt(|x-y|^2 + c^2) - c with c = 0.00054 sqrt(d) (Song &
    Dhariwal 2023); lpips: LPIPS-VGG (needs the lpips package and its weights on disk); features: mean squared
    distance in a feature space: `feature_net`, a digits classifier written by `train.py mode=features` (default
    the shipped loss network, trained apart from FID's; 1x8x8 images) or a transformers vision model's folder
    (DINOv2, CLIP; any image size); contraction: the batch's squared mean log-ratio of neighbour distances, student
    over teacher (`contraction`); feature_contraction: the same in those features; data_mmd: the batch's squared
    MMD in those features to the data (`_data_mmd`: your images, `reference`, a folder; for 1x8x8 images by
    default the digits; the teacher's samples unused); class_mmd: the same within each class the digits network
    sees in the teacher's sample (a sample is compared with the data of its own class); "a+b": the Sum of both,
    each normalised by calibration (`10*a`: weighted 10). With `decode` (a latent teacher's VAE, see
    `pixel_space`) the PIXEL_LOSSES compare the decoded images (of `image_shape`); the others stay in latent space,
    where no decoding is paid."""
    if "+" in name:
        if (problem := check_loss_name(name)) is not None:
            raise ValueError(f"unknown loss {name!r}: {problem}")
        terms = {n: f for f, n in map(split_term, name.split("+"))}
        return Sum({n: distance(n, shape, feature_net, decode, image_shape, reference) for n in terms}, terms)
    if name in PIXEL_LOSSES and decode is not None:
        if image_shape is not None and len(image_shape) == 4:  # video: the loss of each frame, averaged per clip
            on_frames = distance(name, (image_shape[0], *image_shape[2:]), feature_net, reference=reference)
            on_images = lambda x, y: per_frame(on_frames, x, y)  # noqa: E731
            on_images.scale_free = getattr(on_frames, "scale_free", False)
        else:
            on_images = distance(name, image_shape, feature_net, reference=reference)
        decoded = lambda x, y: on_images(decode(x), decode(y)).to(x.dtype)  # noqa: E731
        return scale_free(decoded) if getattr(on_images, "scale_free", False) else decoded
    if name == "l2":
        return lambda x, y: (x - y).pow(2).flatten(1).mean(1)
    if name == "l1":
        return lambda x, y: (x - y).abs().flatten(1).mean(1)
    if name == "pseudo_huber":
        def huber(x, y):
            c = 0.00054 * math.sqrt(x[0].numel())
            return torch.sqrt((x - y).pow(2).flatten(1).sum(1) + c**2) - c
        return huber
    if name == "lpips":
        return _lpips()
    if name == "features":
        return _features(shape, feature_net)
    if name == "spread":
        return spread
    if name == "contraction":
        return scale_free(lambda x, y: contraction(x, y))
    if name == "feature_contraction":
        net = _feature_net(shape, feature_net)
        return scale_free(lambda x, y: contraction(net(x.float()), net(y.float())).to(x.dtype))
    if name in ("data_mmd", "class_mmd"):
        return scale_free(_data_mmd(_feature_net(shape, feature_net), shape, reference, name == "class_mmd"))
    raise ValueError(f"unknown loss {name!r}: expected one of {LOSSES}")


def scale_free(dist):
    """Mark a distance that has no units (a log-ratio): a Sum weighs it by its factor alone, not calibrated."""
    dist.scale_free = True
    return dist


def per_frame(dist, x: Tensor, y: Tensor) -> Tensor:
    """An image distance on videos (B, C, F, H, W): the mean over the F frames of each clip, (B,)."""
    b, f = x.shape[0], x.shape[2]
    frames = [v.transpose(1, 2).flatten(0, 1) for v in (x, y)]
    return dist(*frames).view(b, f).mean(1)


def _lpips():
    try:
        import lpips
    except ImportError:
        raise ValueError("loss=lpips needs the lpips package and its VGG weights on this machine (they are "
                         "downloaded on first use, which needs internet): pip install lpips, run it once online, "
                         "or choose loss=l2, l1 or pseudo_huber") from None
    try:
        net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
    except Exception as err:  # the torchvision VGG weights are fetched from the network when not cached
        raise ValueError(f"LPIPS weights are not available locally ({type(err).__name__}: {err}); run once with "
                         f"internet or choose loss=l2, l1 or pseudo_huber") from None

    def dist(x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # LPIPS expects RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return net.to(x.device, torch.float32)(x.float(), y.float()).flatten()

    return dist


def _feature_net(shape: tuple[int, ...] | None, directory: str):
    """The feature network of loss=features (and the other feature terms): the digits network (1x8x8 images ->
    128-d features; the shipped loss network by default, checking the images' shape) or, for `directory` holding
    a transformers vision model, that model (any image shape)."""
    from .features import LOSS_ASSET, DigitsFeatureNet, load_any_feature_net

    net = load_any_feature_net(directory or LOSS_ASSET)
    digits = isinstance(net, DigitsFeatureNet)

    def check(shape):
        if digits and tuple(shape) != (1, 8, 8):
            raise ValueError(f"loss=features, feature_contraction, data_mmd and class_mmd use the digits feature "
                             f"network, "
                             f"which reads 1x8x8 images, not {tuple(shape)}: give feature_net=<a transformers vision "
                             f"model's folder> (e.g. a local copy of facebook/dinov2-small), or choose loss=l2, l1, "
                             f"pseudo_huber or lpips (and contraction, on the images)")

    if shape is not None:
        check(shape)

    def features(x: Tensor) -> Tensor:
        check(x.shape[1:])
        return net.to(x.device)(x)[0]

    def classes(x: Tensor) -> Tensor:
        check(x.shape[1:])
        return net.to(x.device)(x)[1].argmax(1)

    features.digits = digits
    features.classes = classes if digits else None
    return features


def _features(shape: tuple[int, ...] | None, directory: str):
    net = _feature_net(shape, directory)
    return lambda x, y: (net(x.float()) - net(y.float())).pow(2).mean(1).to(x.dtype)


def spread(x: Tensor, y: Tensor) -> Tensor:
    """How far the student's samples are from being as far apart from each other as the teacher's, sample by
    sample: for sample i, the mean over the batch of (|x_i - x_j| - |y_i - y_j|)^2, over the batch's mean squared
    teacher distance. A paired L2 loss is minimised, where the student cannot follow the teacher, by pulling its
    samples towards their mean (less diversity, which FID against the data punishes); this term is zero for any
    student whose batch has the teacher's pairwise geometry, and grows with that contraction."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, yf = x.flatten(1).to(dtype), y.flatten(1).to(dtype)
    dx, dy = torch.cdist(xf, xf), torch.cdist(yf, yf)
    return ((dx - dy).pow(2).mean(1) / dy.pow(2).mean().clamp_min(1e-12)).to(x.dtype)


def log_scale(x: Tensor, y: Tensor, k: int = 3) -> Tensor:
    """How much larger the student's batch is than the teacher's, near each sample: the mean over samples i and
    their k nearest neighbours j in the teacher's batch of log(|x_i - x_j| / |y_i - y_j|); log s for the teacher's
    batch scaled by s about any point; 0 for a batch of one."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf, yf = x.flatten(1).to(dtype), y.flatten(1).to(dtype)
    k = min(k, len(y) - 1)
    if k < 1:
        return xf.new_zeros(())
    dy = torch.cdist(yf, yf).fill_diagonal_(torch.inf)
    near = dy.topk(k, dim=1, largest=False).indices
    dx = (xf[:, None] - xf[near]).pow(2).sum(-1).clamp_min(1e-30).sqrt()
    return (dx.log() - dy.gather(1, near).clamp_min(1e-30).log()).mean()


def contraction(x: Tensor, y: Tensor) -> Tensor:
    """The batch's contraction, squared, for every sample: log_scale(x, y)^2 (a few-step sampler pulls the
    samples of a neighbourhood together where it cannot follow the teacher, which a paired loss rewards and FID
    against the data punishes). Only the batch's mean scale is asked of the student, not each pair's distance."""
    return log_scale(x, y).pow(2).expand(len(x)).to(x.dtype)


def _data_mmd(net, shape: tuple[int, ...] | None = None, reference: str = "", by_class: bool = False):
    """data_mmd: the squared MMD between the batch's samples and the data, in the feature network's features, with
    Gaussian kernels at 1/4, 1 and 4 times the data's median squared distance; it does not look at the teacher's
    samples at all. The data: your images (`reference`, a folder, checked now, read at the samples' size and
    featurised once, at the first call, where the samples are: on the GPU for a GPU run), or for the digits network
    the digits data's even-indexed images (the odd ones stay unseen, a held-out reference).

    by_class (class_mmd): the same within each class, for a feature network that classifies (the digits one): each
    sample is put in the class the network sees in its teacher's sample (the condition both share) and compared
    with the data of that class (the data's own predicted classes), at scales from the data's within-class median
    squared distance. The batch-batch term is the unbiased one (no sample with itself), so only the classes with
    two or more samples in the batch count, each by its share of the batch. A batch of a class-conditional model
    holds a few samples of each class: an unconditional MMD measures the mix of classes and little of the spread
    within one, which is what guidance and a few-step sampler's contraction take away."""
    from ..teachers.gmm import digits_data
    from .images import iter_reference, reference_files

    if by_class and getattr(net, "classes", None) is None:
        raise ValueError("loss=class_mmd needs a feature network that classifies (the digits network); with a "
                         "vision feature network choose data_mmd")
    if reference:
        reference_files(reference)
        size, channels = (tuple(shape[-2:]), shape[0]) if shape is not None else (None, None)
        batches = lambda: iter_reference(reference, size, channels)  # noqa: E731
    elif getattr(net, "digits", False):
        batches = lambda: [digits_data(torch.float32)[::2]]  # noqa: E731
    else:
        raise ValueError("loss=data_mmd with a vision feature network needs your images: data_reference=<a folder "
                         "of them>")
    data = {}

    def kernel(a: Tensor, b: Tensor, scales: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2)[..., None] / scales).sum(-1)

    def featurise(device) -> tuple:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the data once, in float32
            images = [b.to(device) for b in batches()]
            d = torch.cat([net(b).float() for b in images])
            labels = torch.cat([net.classes(b) for b in images]) if by_class else d.new_zeros(len(d), dtype=torch.long)
            dist2 = torch.cdist(d, d).pow(2)
            if by_class:  # the pairs of one class, each image with the others
                dist2 = dist2[(labels[:, None] == labels[None]) & ~torch.eye(len(d), dtype=torch.bool, device=device)]
            scales = dist2.median() * torch.tensor([0.25, 1.0, 4.0], device=device)
            return d, labels, scales, {int(c): kernel(d[labels == c], d[labels == c], scales).mean()
                                       for c in labels.unique()}

    def term(x: Tensor, y: Tensor) -> Tensor:
        if x.device not in data:
            data[x.device] = featurise(x.device)
        d, labels, scales, data_terms = data[x.device]
        f = net(x.float()).float()
        if not by_class:
            mmd2 = kernel(f, f, scales).mean() + data_terms[0] - 2 * kernel(f, d, scales).mean()
            return mmd2.expand(len(x)).to(x.dtype)
        with torch.no_grad():
            classes = net.classes(y.float())
        mmd2 = f.new_zeros(())
        for c in classes.unique().tolist():
            fc = f[classes == c]
            n = len(fc)
            if n < 2 or c not in data_terms:
                continue
            within = (kernel(fc, fc, scales).sum() - len(scales) * n) / (n * (n - 1))  # each kernel 1 on the diagonal
            mmd2 = mmd2 + n / len(x) * (within + data_terms[c] - 2 * kernel(fc, d[labels == c], scales).mean())
        return mmd2.expand(len(x)).to(x.dtype)

    return term
