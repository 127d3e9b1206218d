"""Dense CRF in pure PyTorch: the model of :func:`smooseg.eval.crf.dense_crf`, batched, on CPU or CUDA.

The fully connected CRF of Krähenbühl & Koltun (2011) as pydensecrf2 1.1 computes it, written
again with vectorised torch ops (no compiled extension):

* Features.  Gaussian term: ``(x / sxy, y / sxy)``; bilateral term: ``(x / sxy, y / sxy,
  B / srgb, G / srgb, R / srgb)`` (the reference is fed the image in BGR order), all float32.
* Permutohedral lattice (Adams et al. 2010).  Each d-dimensional feature is scaled per axis by
  ``(d+1)·sqrt(2/3) / sqrt((i+1)(i+2))`` and elevated onto the plane ``sum = 0`` of R^(d+1); the
  nearest remainder-0 lattice point is found by rounding (half to even) each coordinate divided by
  ``d+1``, the simplex around it from the ranks of the residuals, and the point's ``d+1`` vertices
  and barycentric weights from those.  Vertices are identified by their first ``d`` integer
  coordinates (plus the image index in a batch), packed into one int64 key (mixed radix over
  the coordinates' ranges; keys too wide for 62 bits fall back to ``torch.unique`` over rows);
  a stable sort groups the entries by vertex, the vertices are numbered in order of first use
  (as the reference's hash table does), and ``searchsorted`` finds, for each of the ``d+1``
  lattice directions, the neighbour ``v + (d+1)·e_j - 1``; the opposite neighbour is the
  inverse relation, and a missing one reads zero.
* Filtering = splat (sparse CSR matmul: each point adds ``weight × value`` to its vertices),
  blur along the directions ``0..d`` in turn (``v <- v + (left + right) / 2``, gathers; only the
  vertices with a neighbour along a direction where those are few), slice (a CSR matmul: the
  weighted sum over the point's vertices) and the constant ``1 / (1 + 2^-d)``.
* Kernel normalisation (pydensecrf's default, symmetric): ``n = 1 / sqrt(filter(1))`` and the
  message is ``n · filter(n · Q)``.  Potts compatibility ``w``: the message enters as ``+w·msg``.
* Mean field: ``Q0 = softmax(-U)`` with ``U = -log(max(p, 1e-5))``; each iteration
  ``Q = softmax(-U + Σ_terms w · n · filter(n · Q))``.

Like pydensecrf's SSE build (the one its x86 wheels ship), a lattice whose point count is not a
multiple of 4 also holds the vertices of one zero feature vector (its 4-wide blocks are padded
with zeros, and the padding's vertices enter the hash table): they carry no value of their own
but pass values on during the blur, so they are kept here for parity.

The lattice of a filter is built once per batch and reused for every iteration and every class;
the Gaussian term depends on the pixel grid alone, so one lattice serves the whole batch (and
the last few image sizes' are cached, see :func:`clear_grid_cache`), while
the bilateral term uses one joint lattice whose keys carry the image index, so images never mix
(a batch gives the same marginals as its images one by one).

Memory, per pixel of the batch, K classes, rho = lattice vertices per pixel (the bilateral
lattice has rho ~ 0.9-1.4 on natural-looking images and ~6 on colour noise, the Gaussian one
1.16): mean field holds 16·K bytes (unary, Q, energy, message) plus up to three lattice-value
buffers of 4·K·rho bytes; the lattices hold ~110 bytes (Gaussian, cached per image size) and
~190-380 bytes (bilateral; int32 indices), and building the bilateral one needs ~560-1200 bytes
for a moment.  Measured peaks of live tensors at K=27: ~1.0 kB per pixel on a street scene
(~100 MB for one 320×320 image), ~2.0 kB per pixel on colour noise; a batch needs that per
pixel of all its images.  ``python -m benchmarks.crf_bench`` reports process peaks.
"""

import collections
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from smooseg.errors import SmoosegError

# Packed vertex keys use at most this many bits (int64, with room for the neighbour offsets).
MAX_KEY_BITS = 62
UNARY_CLIP = 1e-5
# Blur only the vertices with a neighbour along a direction when they are fewer than this share.
SPARSE_BLUR_FRACTION = 0.5


def _scale_factors(dim):
    """Per-axis scale of the elevation, rounded to float32 as the reference computes it."""
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (dim + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 1) * (i + 2)) * inv_std_dev)) for i in range(dim)]


def _index_dtype(bound):
    """int32 for indices below ``bound`` when they fit (half the memory), else int64."""
    return torch.int32 if bound < 2 ** 31 else torch.int64


def _spmm(matrix, dense):
    """CSR matrix × dense matrix into a fresh tensor: ``addmm`` with beta = 0 (the output is not
    read) skips the zero fill and copy that ``matrix @ dense`` makes, half its time on CPU."""
    out = dense.new_empty(matrix.shape[0], dense.shape[1])
    return torch.addmm(out, matrix, dense, beta=0, out=out)


def _csr(crow, col, values, size):
    """A CSR matrix (int32 indices when they fit) without the beta-state warnings torch prints
    for sparse CSR construction."""
    index = _index_dtype(max(values.numel(), *size) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(index), col.to(index), values, size=size,
                                       check_invariants=False)


class PermutohedralLattice:
    """Gaussian filtering of values living on points in feature space, pydensecrf's way.

    ``features`` is an N×d float tensor (converted to float32; its device is used throughout).
    ``counts`` splits the N points into consecutive groups (one per image) whose lattices are kept
    apart: filtering never carries values from one group to another.  ``filter(values)`` then
    computes, for N×C (or N) values, what pydensecrf's ``Permutohedral::compute`` does: splat onto
    the lattice, blur along its d+1 directions, slice back, times ``1 / (1 + 2^-d)``.
    """

    def __init__(self, features, counts=None):
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] < 1 \
                or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise SmoosegError(f"PermutohedralLattice: expected an N×d float tensor of features (d >= 1), "
                               f"got {shape}")
        if features.shape[0] == 0:
            raise SmoosegError("PermutohedralLattice: expected at least one point, got 0×d features")
        if not torch.isfinite(features).all():
            raise SmoosegError("PermutohedralLattice: features must be finite (no NaN or inf)")
        features = features.detach().float().contiguous()
        n_points, dim = features.shape
        counts = [n_points] if counts is None else [int(c) for c in counts]
        if any(c < 0 for c in counts) or sum(counts) != n_points:
            raise SmoosegError(f"PermutohedralLattice: counts must be >= 0 and add up to the {n_points} "
                               f"points, got {sum(counts)} in {len(counts)} groups")
        self.device = features.device
        self.dim = dim
        self.n_points = n_points
        self.counts = counts
        self.alpha = 1.0 / (1.0 + 2.0 ** -dim)
        self._build(features)

    # -- construction -------------------------------------------------------------------------

    def _points(self, features):
        """Features and group ids of the real points followed by the zero padding points."""
        device = self.device
        group = torch.repeat_interleave(torch.arange(len(self.counts), device=device),
                                        torch.tensor(self.counts, device=device))
        padded = [g for g, c in enumerate(self.counts) if c % 4]
        if padded:
            features = torch.cat([features, features.new_zeros(len(padded), self.dim)])
            group = torch.cat([group, torch.tensor(padded, device=device, dtype=group.dtype)])
        return features, group

    def _simplices(self, features):
        """Each point's enclosing simplex: remainder-0 point ``rem0`` and ``rank`` ((d+1)×P, int64)
        and the barycentric weights of its d+1 vertices ((d+1)×P, float32, by remainder)."""
        d, n = self.dim, features.shape[0]
        scale = torch.tensor(_scale_factors(d), dtype=torch.float32, device=self.device)
        feat = features.t()
        elevated = features.new_empty(d + 1, n)
        partial = features.new_zeros(n)
        for j in range(d, 0, -1):
            cf = feat[j - 1] * scale[j - 1]
            elevated[j] = partial - j * cf
            partial = partial + cf
        elevated[0] = partial

        down = torch.tensor(np.float32(1.0) / np.float32(d + 1), device=self.device)
        nearest = torch.round(elevated * down)  # half to even, as the SSE build rounds
        rem0 = nearest * (d + 1)
        residual = elevated - rem0
        # rank[i]: how many coordinates have a larger residual (ties count for the later one).
        rank = nearest.sum(0).to(torch.int64).expand(d + 1, n).clone()
        for i in range(d):
            for j in range(i + 1, d + 1):
                less = residual[i] < residual[j]
                rank[i] += less
                rank[j] += ~less
        wrap = (rank < 0).to(torch.int64) - (rank > d).to(torch.int64)
        rank += (d + 1) * wrap
        rem0 = rem0.to(torch.int64) + (d + 1) * wrap

        delta = (elevated - rem0.to(torch.float32)) * down
        by_rank = torch.empty_like(delta).scatter_(0, rank, delta)
        bary = torch.empty_like(delta)
        bary[1:] = by_rank.flip(0)[1:] - by_rank.flip(0)[:-1]  # p: by_rank[d-p] - by_rank[d-p+1]
        bary[0] = by_rank[d] + (1.0 - by_rank[0])
        return rem0, rank, bary

    def _vertex_keys(self, rem0, rank, coord):
        """Coordinate ``coord`` of every point's vertices, (d+1)×P: remainder r adds r, minus d+1
        where the coordinate's rank exceeds d - r."""
        d = self.dim
        remainder = torch.arange(d + 1, device=self.device)[:, None]
        return rem0[coord] + remainder - (d + 1) * (rank[coord] > d - remainder).to(torch.int64)

    def _number_vertices(self, rem0, rank, group):
        """Group the (point, remainder) entries by vertex.

        Returns ``perm`` (entry indices, point-major ``p·(d+1) + r``, sorted stably by vertex),
        ``starts`` (where each vertex's run begins in ``perm``; vertices numbered by key order)
        and the neighbour tables (d+1)×2×M in that numbering, M marking a missing neighbour.
        """
        d = self.dim
        # Coordinate c of a vertex of a point lies in [rem0 - rank, rem0 + d - rank]; neighbours
        # move it by at most d, so a margin of d keeps every neighbour key inside its digit.
        low = [int((rem0[c] - rank[c]).min()) - d for c in range(d)]
        radix = [int((rem0[c] - rank[c]).max()) + 2 * d + 1 - low[c] for c in range(d)]
        if len(self.counts) * math.prod(radix) >= 2 ** MAX_KEY_BITS:
            return self._number_vertices_rows(rem0, rank, group)
        strides = [1] * d
        for c in range(d - 2, -1, -1):
            strides[c] = strides[c + 1] * radix[c + 1]
        packed = group[None, :] * (strides[0] * radix[0])
        for c in range(d):
            packed = packed + (self._vertex_keys(rem0, rank, c) - low[c]) * strides[c]
        keys, perm = torch.sort(packed.t().reshape(-1), stable=True)
        starts = self._run_starts(keys)
        vertices = keys[starts]
        m = vertices.numel()
        index = _index_dtype(m + 1)
        neighbours = torch.full((d + 1, 2, m + 1), m, dtype=index, device=self.device)
        ids = torch.arange(m, dtype=index, device=self.device)
        for j in range(d + 1):
            # direction j: every coordinate -1 except coordinate j +d (for j = d, the implied one);
            # the opposite neighbour is the inverse relation.
            offset = sum(d * strides[c] if c == j else -strides[c] for c in range(d))
            query = vertices + offset
            pos = torch.searchsorted(vertices, query, out_int32=index == torch.int32).clamp_(max=m - 1)
            found = torch.where(vertices[pos] == query, pos, m)
            neighbours[j, 0, :m] = found
            neighbours[j, 1].scatter_(0, found.long(), ids)
        return perm, starts, neighbours[:, :, :m]

    @staticmethod
    def _run_starts(sorted_keys):
        """Indices where a new value begins in a sorted 1-D tensor."""
        change = torch.ones_like(sorted_keys, dtype=torch.bool)
        change[1:] = sorted_keys[1:] != sorted_keys[:-1]
        return change.nonzero()[:, 0]

    def _number_vertices_rows(self, rem0, rank, group):
        """The same grouping for keys too wide to pack into int64: unique rows (group id first)."""
        d = self.dim
        rows = torch.stack([group.expand(d + 1, -1)]
                           + [self._vertex_keys(rem0, rank, c) for c in range(d)], 2)
        vertices, inverse = torch.unique(rows.transpose(0, 1).reshape(-1, d + 1), dim=0, sorted=True,
                                         return_inverse=True)
        m = vertices.shape[0]
        ids, perm = torch.sort(inverse, stable=True)
        queries = []
        for j in range(d + 1):
            step = torch.full((d,), -1, dtype=torch.int64, device=self.device)
            if j < d:
                step[j] = d
            for sign in (1, -1):
                moved = vertices.clone()
                moved[:, 1:] += sign * step
                queries.append(moved)
        _, union = torch.unique(torch.cat([vertices] + queries), dim=0, return_inverse=True)
        table = torch.full((int(union.max()) + 1,), m, dtype=torch.int64, device=self.device)
        table[union[:m]] = torch.arange(m, device=self.device)
        neighbours = table[union[m:]].view(d + 1, 2, m).to(_index_dtype(m + 1))
        return perm, self._run_starts(ids), neighbours

    def _build(self, features):
        d, n = self.dim, self.n_points
        points, group = self._points(features)
        rem0, rank, bary = self._simplices(points)
        perm, starts, neighbours = self._number_vertices(rem0, rank, group)
        m, n_entries = starts.numel(), perm.numel()
        device = self.device
        run_length = torch.diff(starts, append=torch.tensor([n_entries], device=device))
        # Renumber the vertices in order of first use, point by point (the reference's hash-table
        # order): neighbouring pixels then share nearby rows, which keeps the gathers local.
        order = torch.argsort(perm[starts])  # new id -> key-order id
        renumber = torch.empty(m + 1, dtype=_index_dtype(m + 1), device=device)
        renumber[order] = torch.arange(m, dtype=renumber.dtype, device=device)
        renumber[m] = m
        self.n_vertices = m
        neighbours = neighbours.view(-1, m).index_select(1, order).view(-1)
        self._blur_plan = self._plan_blur(renumber.index_select(0, neighbours).view(d + 1, 2, m))
        del neighbours
        weight = bary.t().reshape(-1)  # point-major, like the entries

        # Splat: (M+1)×N CSR, row v = the real points' entries of vertex v in point order (the
        # runs of perm, taken in the new order); row M stays empty, the zero that missing
        # neighbours read during the blur.  Zero padding points splat nothing.
        counts = run_length[order]
        run_begin = torch.cumsum(counts, 0) - counts
        within = torch.arange(n_entries, device=device) - torch.repeat_interleave(run_begin, counts)
        entries = perm[torch.repeat_interleave(starts[order], counts) + within]
        real = entries < n * (d + 1)
        crow = torch.zeros(m + 2, dtype=torch.int64, device=device)
        crow[1:m + 1] = torch.cumsum(real, 0)[run_begin + counts - 1]
        crow[m + 1] = crow[m]
        entries = entries[real]
        self._splat = _csr(crow, entries // (d + 1), weight[entries], (m + 1, n))
        del entries, within, real

        # Slice: N×(M+1) CSR, each point's d+1 vertices (sorted) and weights.
        key_order_id = torch.empty(n_entries, dtype=torch.int64, device=device).scatter_(
            0, perm, torch.repeat_interleave(torch.arange(m, device=device), run_length))
        vertex = renumber[key_order_id].view(-1, d + 1)[:n]
        sorted_vertex, slot = vertex.sort(1)
        self._slice = _csr(torch.arange(0, n * (d + 1) + 1, d + 1, device=device), sorted_vertex.reshape(-1),
                           weight.view(-1, d + 1)[:n].gather(1, slot).reshape(-1), (n, m + 1))

    # -- filtering ----------------------------------------------------------------------------

    def filter(self, values):
        """Filter N×C (or N) values: splat, blur along every lattice direction, slice, scale."""
        vector = isinstance(values, torch.Tensor) and values.ndim == 1
        if not isinstance(values, torch.Tensor) or values.ndim not in (1, 2) \
                or values.shape[0] != self.n_points:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise SmoosegError(f"PermutohedralLattice.filter: expected a tensor of {self.n_points} values "
                               f"(N or N×C), got {shape}")
        values = values.to(device=self.device, dtype=torch.float32)
        if vector:
            values = values[:, None]
        out = _spmm(self._slice, self._blur(_spmm(self._splat, values.contiguous())))
        out.mul_(self.alpha)
        return out[:, 0] if vector else out

    def scaled(self, norm):
        """The splat and slice matrices with ``norm`` (N) folded in, and alpha into the slice:
        ``slice' @ blur(splat' @ v) == norm · filter(norm · v)`` up to float rounding."""
        splat = _csr(self._splat.crow_indices(), self._splat.col_indices(),
                     self._splat.values() * norm[self._splat.col_indices().long()], self._splat.shape)
        rows = torch.arange(self.n_points, device=self.device).repeat_interleave(self.dim + 1)
        slice_ = _csr(self._slice.crow_indices(), self._slice.col_indices(),
                      self._slice.values() * (norm[rows] * self.alpha), self._slice.shape)
        return splat, slice_

    def _blur(self, lattice):
        """v <- v + (left + right) / 2 along directions 0..d, each from the previous direction's
        values; ``lattice`` is (M+1)×C with a zero last row (what a missing neighbour reads).

        A direction where most vertices have no neighbour (a sparse lattice: noisy colours)
        updates only the vertices that have one, in place; otherwise all, into a second buffer.
        """
        m = self.n_vertices
        spare = None
        for rows, left, right in self._blur_plan:
            if rows is None:
                if spare is None:
                    spare = torch.empty_like(lattice)
                    spare[m] = 0
                blurred = spare[:m]
                torch.index_select(lattice, 0, left, out=blurred)
                blurred += lattice.index_select(0, right)
                torch.add(lattice[:m], blurred, alpha=0.5, out=blurred)
                lattice, spare = spare, lattice
            else:
                step = lattice.index_select(0, left)
                step += lattice.index_select(0, right)
                torch.add(lattice.index_select(0, rows), step, alpha=0.5, out=step)
                lattice.index_copy_(0, rows, step)
        return lattice

    def _plan_blur(self, neighbours):
        """Per direction: (None, left, right) over all vertices, or (rows, left, right) over the
        vertices with a neighbour when they are fewer than half (rows int64, the rest int32)."""
        m = self.n_vertices
        index = _index_dtype(m + 1)
        plan = []
        for left, right in neighbours:
            rows = ((left < m) | (right < m)).nonzero()[:, 0]
            if rows.numel() < SPARSE_BLUR_FRACTION * m:
                plan.append((rows, left[rows].to(index), right[rows].to(index)))
            else:
                plan.append((None, left.to(index).clone(), right.to(index).clone()))  # free the table
        return plan


class _NormalisedKernel:
    """pydensecrf's DenseKernel with NORMALIZE_SYMMETRIC: ``n · filter(n · Q)``, n = filter(1)^-1/2."""

    def __init__(self, lattice):
        self.lattice = lattice
        ones = torch.ones(lattice.n_points, device=lattice.device)
        norm = torch.rsqrt(lattice.filter(ones).double() + 1e-20).float()
        self._splat, self._slice = lattice.scaled(norm)

    def apply(self, values):
        return _spmm(self._slice, self.lattice._blur(_spmm(self._splat, values.contiguous())))


# -- the CRF ------------------------------------------------------------------------------------


def _as_tensor(x, what):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise SmoosegError(f"dense_crf_torch: {what} must be a torch tensor or numpy array, "
                       f"got {type(x).__name__}")


def _check_inputs(images, log_probs):
    images = _as_tensor(images, "images")
    log_probs = _as_tensor(log_probs, "log_probs")
    if images.ndim not in (3, 4) or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise SmoosegError(f"dense_crf_torch: images must be uint8 B×H×W×3 (or one H×W×3) RGB, got "
                           f"{images.dtype} {tuple(images.shape)}; convert float images with "
                           "smooseg.eval.crf.to_uint8_image")
    if log_probs.ndim != images.ndim or not log_probs.is_floating_point():
        want = "B×K×h×w" if images.ndim == 4 else "K×h×w"
        raise SmoosegError(f"dense_crf_torch: log_probs must be a float {want} tensor to go with images of "
                           f"shape {tuple(images.shape)}, got {log_probs.dtype} {tuple(log_probs.shape)}")
    single = images.ndim == 3
    if single:
        images, log_probs = images[None], log_probs[None]
    if log_probs.shape[0] != images.shape[0]:
        raise SmoosegError(f"dense_crf_torch: {images.shape[0]} images but {log_probs.shape[0]} "
                           "log-prob maps; pass one K×h×w map per image")
    if min(log_probs.shape) < 1 or min(images.shape) < 1:
        raise SmoosegError(f"dense_crf_torch: empty input (images {tuple(images.shape)}, log_probs "
                           f"{tuple(log_probs.shape)}); every dimension must be >= 1")
    return images, log_probs, single


def _check_params(iters, params):
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise SmoosegError(f"dense_crf_torch: iters must be an integer >= 0, got {iters!r}")
    for name, value in params.items():
        ok = (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
              and math.isfinite(value))
        if not ok or (not name.endswith("compat") and value <= 0):
            need = "a finite number" if name.endswith("compat") else "a finite number > 0"
            raise SmoosegError(f"dense_crf_torch: {name} must be {need}, got {value!r}")


def _grid_features(height, width, sxy, device):
    """(x / sxy, y / sxy) for every pixel in row-major order, float32."""
    sxy = torch.tensor(float(np.float32(sxy)), device=device)
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs.reshape(-1) / sxy, ys.reshape(-1) / sxy], 1)


def crf_lattices(images, gaussian_sxy=1, bilateral_sxy=67, bilateral_srgb=3):
    """The two kernels' lattices for a uint8 B×H×W×3 RGB batch: (gaussian, bilateral).

    The Gaussian lattice covers one H×W grid (shared by the batch); the bilateral one all B
    images, image after image, each pixel's colour taken in BGR order as dense_crf feeds it.
    """
    batch, height, width, _ = images.shape
    gaussian = PermutohedralLattice(_grid_features(height, width, gaussian_sxy, images.device))
    return gaussian, _bilateral_lattice(images, bilateral_sxy, bilateral_srgb)


def _bilateral_lattice(images, sxy, srgb):
    batch, height, width, _ = images.shape
    srgb = torch.tensor(float(np.float32(srgb)), device=images.device)
    colour = images.flip(-1).reshape(batch, height * width, 3).to(torch.float32) / srgb
    position = _grid_features(height, width, sxy, images.device).expand(batch, -1, -1)
    features = torch.cat([position, colour], 2).reshape(batch * height * width, 5)
    return PermutohedralLattice(features, counts=[height * width] * batch)


# The Gaussian kernel depends on the grid alone: the last few (size, sxy, device) are kept.
GRID_CACHE_SIZE = 4
_grid_kernels = collections.OrderedDict()


def _grid_kernel(height, width, sxy, device):
    key = (height, width, float(np.float32(sxy)), str(device))
    kernel = _grid_kernels.pop(key, None)
    if kernel is None:
        kernel = _NormalisedKernel(PermutohedralLattice(_grid_features(height, width, sxy, device)))
    _grid_kernels[key] = kernel
    while len(_grid_kernels) > GRID_CACHE_SIZE:
        _grid_kernels.popitem(last=False)
    return kernel


def clear_grid_cache():
    """Drop the cached Gaussian-term lattices (about 170 bytes per pixel each)."""
    _grid_kernels.clear()


def dense_crf_torch(images, log_probs, iters=10, gaussian_sxy=1, gaussian_compat=3,
                    bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4):
    """Fully connected CRF marginals (float32 B×K×H×W) for a batch, the model of smooseg.eval.crf.dense_crf.

    ``images``: uint8 B×H×W×3 RGB (tensor or numpy); ``log_probs``: float B×K×h×w, resized
    bilinearly (align_corners=False) to H×W.  A single H×W×3 image with K×h×w log-probs gives
    K×H×W.  Runs on the inputs' device (that of ``log_probs`` when the two differ and it is not
    the CPU), float32 throughout; returns a torch tensor on that device.  Memory: ~1 kB per
    pixel of the batch at K=27 on natural images, ~2 kB on colour noise (module docstring).
    """
    images, log_probs, single = _check_inputs(images, log_probs)
    _check_params(iters, {"gaussian_sxy": gaussian_sxy, "gaussian_compat": gaussian_compat,
                          "bilateral_sxy": bilateral_sxy, "bilateral_srgb": bilateral_srgb,
                          "bilateral_compat": bilateral_compat})
    device = log_probs.device if log_probs.device.type != "cpu" else images.device
    images, log_probs = images.to(device), log_probs.to(device)
    batch, height, width, _ = images.shape
    n_classes, n_pixels = log_probs.shape[1], height * width

    probs = torch.softmax(F.interpolate(log_probs.float(), size=(height, width), mode="bilinear",
                                        align_corners=False), dim=1)
    # -unary = log(max(p, 1e-5)), pixel-major: B×N×K
    neg_unary = torch.log(probs.clamp_(UNARY_CLIP, 1.0)).permute(0, 2, 3, 1)
    neg_unary = neg_unary.reshape(batch, n_pixels, n_classes)
    del probs
    q = torch.softmax(neg_unary, dim=2)
    terms = []  # (kernel, Potts weight, whether one H×W lattice serves the batch); w = 0 adds nothing
    if iters > 0 and gaussian_compat != 0:
        terms.append((_grid_kernel(height, width, gaussian_sxy, device), float(np.float32(gaussian_compat)),
                      True))
    if iters > 0 and bilateral_compat != 0:
        terms.append((_NormalisedKernel(_bilateral_lattice(images, bilateral_sxy, bilateral_srgb)),
                      float(np.float32(bilateral_compat)), False))
    if terms:
        for _ in range(iters):
            energy = neg_unary.clone()
            for kernel, weight, shared_grid in terms:
                if shared_grid:  # one H×W lattice for the batch: images side by side as columns
                    columns = q.permute(1, 0, 2).reshape(n_pixels, batch * n_classes)
                    message = kernel.apply(columns).view(n_pixels, batch, n_classes).permute(1, 0, 2)
                else:
                    message = kernel.apply(q.reshape(batch * n_pixels, n_classes))
                    message = message.view(batch, n_pixels, n_classes)
                energy.add_(message, alpha=weight)
            q = torch.softmax(energy, dim=2)
    out = q.view(batch, height, width, n_classes).permute(0, 3, 1, 2).contiguous()
    return out[0] if single else out
