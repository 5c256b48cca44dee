"""Where the bf16 error of the Monarch kernels comes from: a numpy model of one-iteration Monarch
attention (bidirectional, layout 1/1/1) and its backward in float64, with rounding to bf16
injected at the points where the CUDA kernels round (docs/numerics.md, "Precision on the GPU").

It first checks its own backward against finite differences, then, on one head of the real
30 x 52 tiles (2 frames, D = 128, inputs as in the GPU tests: q, k ~ 1.5 N(0, 1)), prints the
relative L2 error of out, dq, dk, dv against the unrounded model for each rounding point alone
and all together, at scales of 1 and 4 times 1 / sqrt(D); then the stage-1 operand rounded as
R = exp(z - lse) (the kernels before the thirty-second session) against P = exp(z - max) with the
division by the row sum after the product (since), all other roundings on.

Needs numpy only: python3 bench/bf16_rounding_model.py
"""
import numpy as np


def bf16(x):
    """Rounds to the nearest bf16 (ties to even), returned as float64."""
    a = np.asarray(x, dtype=np.float32).copy()
    u = a.view(np.uint32)
    u += 0x7FFF + ((u >> 16) & 1)
    u &= 0xFFFF0000
    return a.astype(np.float64)


def softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def stage1_operand(z, R, rnd):
    """The probabilities the aL = R K and Y = R V products see."""
    if "P" in rnd:  # exp(z - max) rounded (its largest element exactly 1), divided afterwards
        P = np.exp(z - z.max(-1, keepdims=True))
        return bf16(P) / P.sum(-1, keepdims=True)
    return bf16(R) if "R" in rnd else R


def forward(q, K, V, s, rnd):
    """q: [A, b1, b2, D] indexed (m, l, j); K, V: [F, b1, b2, D] indexed (n, k, i)."""
    r = lambda x, key: bf16(x) if key in rnd else x
    z = s * np.einsum("mkjd,nkid->mjnki", q, K)  # stage 1, softmax over the keys i of row k
    R = softmax(z, -1)
    logR = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    cL = (R * logR).sum(-1)
    Rop = stage1_operand(z, R, rnd)
    aL = r(np.einsum("mjnki,nkid->mjnkd", Rop, K), "ws")
    Y = r(np.einsum("mjnki,nkid->mjnkd", Rop, V), "ws")
    u = s * np.einsum("mljd,mjnkd->mljnk", q, aL) - cL[:, None]  # stage 2 over the virtual keys
    L = softmax(u.reshape(*u.shape[:3], -1), -1).reshape(u.shape)
    out = np.einsum("mljnk,mjnkd->mljd", r(L, "L"), Y)
    return dict(z=z, R=R, logR=logR, aL=aL, Y=Y, L=L, out=out)


def backward(q, K, V, dO, s, rnd=frozenset()):
    """out, dq, dK, dV with the math of docs/cuda-backward.md ("Math in one screen")."""
    r = lambda x, key: bf16(x) if key in rnd else x
    f = forward(q, K, V, s, rnd)
    R, logR, aL, Y, L, out = f["R"], f["logR"], f["aL"], f["Y"], f["L"], f["out"]
    G = np.einsum("mljd,mjnkd->mljnk", dO, Y)
    Delta = np.einsum("mljd,mljd->mlj", dO, r(out, "out"))
    du = L * (G - Delta[..., None, None])
    dq = s * np.einsum("mljnk,mjnkd->mljd", r(du, "du"), aL)
    daL = r(s * np.einsum("mljnk,mljd->mjnkd", r(du, "du"), q), "dws")
    dY = r(np.einsum("mljnk,mljd->mjnkd", r(L, "L"), dO), "dws")
    dcL = -du.sum(1)
    dR = (np.einsum("mjnkd,nkid->mjnki", daL, K) + np.einsum("mjnkd,nkid->mjnki", dY, V) +
          dcL[..., None] * logR)
    dz = R * (dR - (R * dR).sum(-1, keepdims=True))
    sdz, Rop = r(s * dz, "dz"), r(R, "Rbwd")
    dq = dq + np.einsum("mjnki,nkid->mkjd", sdz, K)
    dK = np.einsum("mjnki,mjnkd->nkid", Rop, daL) + np.einsum("mjnki,mkjd->nkid", sdz, q)
    dV = np.einsum("mjnki,mjnkd->nkid", Rop, dY)
    return out, dq, dK, dV


def inputs(rng, A, b1, b2, D):
    shape = (A, b1, b2, D)
    return (bf16(1.5 * rng.standard_normal(shape)), bf16(1.5 * rng.standard_normal(shape)),
            bf16(rng.standard_normal(shape)), bf16(rng.standard_normal(shape)))


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def main():
    rng = np.random.default_rng(1)
    q, K, V, dO = inputs(rng, 2, 3, 4, 5)
    _, *grads = backward(q, K, V, dO, 0.7)
    worst = 0.0
    for which, g in enumerate(grads):
        for _ in range(5):
            idx = tuple(rng.integers(0, n) for n in q.shape)
            fd = 0.0
            for sign in (1, -1):
                args = [q.copy(), K.copy(), V.copy()]
                args[which][idx] += sign * 1e-6
                fd += sign * (forward(*args, 0.7, frozenset())["out"] * dO).sum() / 2e-6
            worst = max(worst, abs(fd - g[idx]) / abs(fd))
    print(f"model backward against finite differences: worst relative error {worst:.1e}")

    q, K, V, dO = inputs(rng, 2, 30, 52, 128)
    kernels = {"R", "Rbwd", "ws", "L", "du", "dws", "dz", "out"}
    points = [("all (as the kernels before)", kernels), ("aL, Y in the workspace", {"ws"}),
              ("R as the stage-1 operand", {"R"}), ("R in the dK, dV products", {"Rbwd"}),
              ("L as the stage-2 operand", {"L"}),
              ("du as an operand", {"du"}), ("daL, dY in the workspace", {"dws"}), ("s dz as an operand", {"dz"}),
              ("out for Delta", {"out"})]
    for factor in (1.0, 4.0):
        s = factor / np.sqrt(128)
        exact = backward(q, K, V, dO, s)
        print(f"\nscale {factor} / sqrt(D): relative L2 error against the unrounded model")
        for name, keys in points:
            e = [rel(g, w) for g, w in zip(backward(q, K, V, dO, s, frozenset(keys)), exact)]
            print(f"  {name:30s} out {e[0]:.2e}  dq {e[1]:.2e}  dk {e[2]:.2e}  dv {e[3]:.2e}")
    print("\nthe stage-1 operand, all other roundings on: out / largest of dq, dk, dv")
    for factor in (0.5, 1.0, 2.0, 3.0, 4.0):
        s = factor / np.sqrt(128)
        exact = backward(q, K, V, dO, s)
        cells = []
        for keys in (kernels, (kernels - {"R"}) | {"P"}):
            e = [rel(g, w) for g, w in zip(backward(q, K, V, dO, s, frozenset(keys)), exact)]
            cells.append(f"{e[0]:.2e} / {max(e[1:]):.2e}")
        print(f"  scale {factor} / sqrt(D): R = exp(z - lse) rounded {cells[0]};  P = exp(z - max) rounded {cells[1]}")


if __name__ == "__main__":
    main()
