#!/usr/bin/env python3
# Phase-by-phase emulation, in plain Python, of the index math of the GEMM-shaped kernels
# (kernels-ptx/device/gemm.rs and mma.rs): which thread loads which element of A and B, where
# it goes in the double-buffered shared tiles, which shared values each micro-tile (CUDA cores)
# or mma.m16n8k8 fragment (TF32, rebuilt from the PTX ISA fragment layouts) reads, and where the
# epilogue writes; u32 arithmetic wraps as on the device, shared memory starts as NaN so a read
# of an unwritten slot fails. Compared with a naive GEMM / conv / masked conv on small awkward
# sizes (several blocks, several k-steps). A hand transcription: it checks the reasoning, not the
# compiled PTX, and must be kept in step with the kernels by hand. No GPU, no numpy; a few seconds.
# Usage: tools/gemm-index-emu.py
import random
BM, BN, BK = 128, 64, 16
MASK = 0xffffffff
def u(x): return x & MASK

class DenseA:
    def __init__(s, a, m, k): s.a, s.m, s.k = a, m, k
    def row(s, r): return u(r * s.k) if r < s.m else MASK
    def col(s, k): return k
    def load(s, row, col): return s.a[row + col] if (row != MASK and col < s.k) else 0.0

OUTSIDE = 0x4000_0000
class ConvA:
    def __init__(s, x, h, w, cin, kh, kw, stride, pad, oh, ow, m):
        s.x, s.h, s.w, s.cin, s.kw, s.stride, s.pad, s.ow, s.ohw, s.m = x, h, w, cin, kw, stride, pad, ow, oh*ow, m
        s.k = kh*kw*cin
    def col(s, k):
        if k >= s.k: return (OUTSIDE, OUTSIDE, 0)
        tap = k // s.cin; ci = k - tap*s.cin; ky = tap // s.kw; kx = tap - ky*s.kw
        return (u(ky - s.pad), u(kx - s.pad), ci)
    def grow(s, position, mp):
        oy = position // s.ow; ox = position - oy*s.ow
        return (u(oy*s.stride), u(ox*s.stride), mp)
    def row(s, r):
        if r >= s.m: return (OUTSIDE, OUTSIDE, 0)
        b = r // s.ohw
        return s.grow(r - b*s.ohw, b)
    def pos(s, row, col):
        iy = u(row[0] + col[0]); ix = u(row[1] + col[1])
        return u(u(iy*s.w) + ix), (iy < s.h) and (ix < s.w)
    def load(s, row, col):
        p, inside = s.pos(row, col)
        if not inside: return 0.0
        return s.x[(row[2]*s.h*s.w + p)*s.cin + col[2]]

class MaskedA(ConvA):
    def __init__(s, fresh, cached, row_of, rows, h, w, cin, kh, kw, stride, pad, ow, m):
        super().__init__(None, h, w, cin, kh, kw, stride, pad, 1, ow, m)
        s.fresh, s.cached, s.row_of, s.rows = fresh, cached, row_of, rows
    def row(s, r):
        if r >= s.m: return (OUTSIDE, OUTSIDE, 0)
        return s.grow(s.rows[2*r+1], s.rows[2*r])
    def load(s, row, col):
        p, inside = s.pos(row, col)
        if not inside: return 0.0
        hw = s.h*s.w
        fr = s.row_of[row[2]*hw + p]
        if fr != MASK: return s.fresh[row[2]][fr*s.cin + col[2]]
        return s.cached[row[2]][p*s.cin + col[2]]

def load_tile(a, rows, b, k0, t, n0):
    col = a.col(k0 + t % 16)
    ar = [a.load(rows[i], col) for i in range(8)]
    br = []
    for i in range(4):
        kk, nn = (t // BN + 4*i, t % BN) if b['kn'] else (t % BK, t // BK + 16*i)
        k, n = k0 + kk, n0 + nn
        if k < b['k'] and n < b['n']:
            at = k*b['n'] + n if b['kn'] else n*b['k'] + k
            br.append(b['b'][at])
        else: br.append(0.0)
    return ar, br

def store_tile(sm, buf, t, ar, br, kn, as_ld, bs_ld):
    A = buf*BK*as_ld; B = 2*BK*as_ld + buf*BK*bs_ld
    for i in range(8): sm[A + (t % 16)*as_ld + t//16 + 16*i] = ar[i]
    for i in range(4):
        kk, nn = (t // BN + 4*i, t % BN) if kn else (t % BK, t // BK + 16*i)
        sm[B + kk*bs_ld + nn] = br[i]

def store_one(e, row, col, acc, out):
    if col >= e['n']: return
    at = row*e['n'] + col
    v = e['alpha']*acc
    if e['beta'] != 0.0: v = e['beta']*out[at] + v
    if e['bias'] is not None: v += e['bias'][col]
    out[at] = v

def block_common(a, b, e, out, bx, by, as_ld, bs_ld, compute, epilogue):
    m0, n0 = by*BM, bx*BN
    sm = [float('nan')]*(2*BK*(as_ld+bs_ld))
    rows = [[a.row(m0 + t//16 + 16*i) for i in range(8)] for t in range(256)]
    st = [None]*256
    ktiles = (b['k'] + BK - 1)//BK
    for t in range(256):
        ar, br = load_tile(a, rows[t], b, 0, t, n0); store_tile(sm, 0, t, ar, br, b['kn'], as_ld, bs_ld)
    accs = [[[0.0]*4 for _ in range(8)] for t in range(256)]
    for kt in range(ktiles):
        cur = kt & 1; more = kt + 1 < ktiles
        if more:
            for t in range(256): st[t] = load_tile(a, rows[t], b, (kt+1)*BK, t, n0)
        compute(sm, cur, accs, as_ld, bs_ld)
        if more:
            for t in range(256): store_tile(sm, 1-cur, t, st[t][0], st[t][1], b['kn'], as_ld, bs_ld)
    epilogue(accs, m0, n0, e, out)

def simt_compute(sm, cur, accs, as_ld, bs_ld):
    A = cur*BK*as_ld; B = 2*BK*as_ld + cur*BK*bs_ld
    for t in range(256):
        tx, ty = t % 16, t // 16; acc = accs[t]
        for kk in range(BK):
            a0 = [sm[A + kk*as_ld + ty*4 + i] for i in range(4)]
            a1 = [sm[A + kk*as_ld + 64 + ty*4 + i] for i in range(4)]
            bv = [sm[B + kk*bs_ld + tx*4 + j] for j in range(4)]
            for i in range(4):
                for j in range(4):
                    acc[i][j] += a0[i]*bv[j]; acc[i+4][j] += a1[i]*bv[j]

def simt_epi(accs, m0, n0, e, out):
    for t in range(256):
        tx, ty = t % 16, t // 16; row = m0 + ty*4; col = n0 + tx*4
        for i, dr in enumerate([0,1,2,3,64,65,66,67]):
            if row + dr >= e['m']: continue
            for j in range(4): store_one(e, row+dr, col+j, accs[t][i][j], out)

def tc_compute(sm, cur, accs, as_ld, bs_ld):
    A = cur*BK*as_ld; B = 2*BK*as_ld + cur*BK*bs_ld
    for ks in (0, 8):
        for warp in range(8):
            wm, wn = (warp & 3)*32, (warp >> 2)*32
            # gather the fragments each lane holds, then apply mma semantics per layout
            fr = {}
            for lane in range(32):
                t = warp*32 + lane; g, q = lane >> 2, lane & 3
                k0, k1 = ks + q, ks + q + 4
                at = lambda k, r: sm[A + k*as_ld + r]; bt = lambda k, c: sm[B + k*bs_ld + c]
                r0, r1 = wm + g, wm + 16 + g; c = wn + g
                fr[lane] = ([at(k0,r0), at(k0,r0+8), at(k1,r0), at(k1,r0+8)],
                            [at(k0,r1), at(k0,r1+8), at(k1,r1), at(k1,r1+8)],
                            [[bt(k0, c+8*nf), bt(k1, c+8*nf)] for nf in range(4)])
            for mf in range(2):
                for nf in range(4):
                    # reconstruct A (16x8) and B (8x8) from the PTX fragment layouts
                    Am = [[None]*8 for _ in range(16)]; Bm = [[None]*8 for _ in range(8)]
                    for lane in range(32):
                        g, q = lane >> 2, lane & 3
                        a = fr[lane][mf]; bb = fr[lane][2][nf]
                        Am[g][q], Am[g+8][q], Am[g][q+4], Am[g+8][q+4] = a
                        Bm[q][g], Bm[q+4][g] = bb
                    for lane in range(32):
                        g, q = lane >> 2, lane & 3; t = warp*32 + lane
                        d = accs[t][mf*4+nf]
                        for idx, (r, cc) in enumerate([(g,2*q),(g,2*q+1),(g+8,2*q),(g+8,2*q+1)]):
                            d[idx] += sum(Am[r][kk]*Bm[kk][cc] for kk in range(8))

def tc_epi(accs, m0, n0, e, out):
    for t in range(256):
        lane, warp = t & 31, t >> 5; g, q = lane >> 2, lane & 3
        wm, wn = (warp & 3)*32, (warp >> 2)*32
        row, col = m0 + wm + g, n0 + wn + 2*q
        for f, (dr, dc) in enumerate([(0,0),(0,8),(0,16),(0,24),(16,0),(16,8),(16,16),(16,24)]):
            v = accs[t][f]; r, c = row+dr, col+dc
            if r < e['m']: store_one(e, r, c, v[0], out); store_one(e, r, c+1, v[1], out)
            if r + 8 < e['m']: store_one(e, r+8, c, v[2], out); store_one(e, r+8, c+1, v[3], out)

def run(a, b, e, out, tc):
    gx, gy = (e['n'] + BN - 1)//BN, (e['m'] + BM - 1)//BM
    for by in range(gy):
        for bx in range(gx):
            if tc: block_common(a, b, e, out, bx, by, BM+8, BN+8, tc_compute, tc_epi)
            else: block_common(a, b, e, out, bx, by, BM+4, BN+4, simt_compute, simt_epi)

def check(name, got, want):
    err = max(abs(g-w) for g, w in zip(got, want))
    print(f"{name}: max err {err:.2e}", "OK" if err < 1e-9 else "FAIL")
    assert err < 1e-9

R = random.Random(1)
rnd = lambda n: [R.uniform(-1, 1) for _ in range(n)]
for tc in (False, True):
    for (m, k, n, kn) in [(7, 20, 5, True), (130, 40, 70, False), (3, 3, 66, True)]:
        A = rnd(m*k); Bv = rnd(k*n); C0 = rnd(m*n); bias = rnd(n)
        out = C0[:]
        e = dict(m=m, n=n, alpha=0.5, beta=-2.0, bias=bias)
        run(DenseA(A, m, k), dict(b=Bv, n=n, k=k, kn=kn), e, out, tc)
        def Bel(kk, nn): return Bv[kk*n+nn] if kn else Bv[nn*k+kk]
        want = [0.5*sum(A[i*k+kk]*Bel(kk, j) for kk in range(k)) - 2*C0[i*n+j] + bias[j] for i in range(m) for j in range(n)]
        check(f"{'tf32' if tc else 'simt'} sgemm {m}x{k}x{n} kn={kn}", out, want)

def conv_ref(x, wt, bias, B, h, w, cin, cout, kh, kw, stride, pad, rows_list, getin):
    oh = (h + 2*pad - kh)//stride + 1; ow = (w + 2*pad - kw)//stride + 1
    res = []
    for (mp, p) in rows_list:
        oy, ox = divmod(p, ow)
        for co in range(cout):
            s = bias[co] if bias else 0.0
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy*stride+ky-pad, ox*stride+kx-pad
                    if 0 <= iy < h and 0 <= ix < w:
                        for ci in range(cin):
                            s += getin(mp, iy*w+ix, ci) * wt[((ky*kw+kx)*cin+ci)*cout+co]
            res.append(s)
    return res

for tc in (False, True):
    for (B, h, w, cin, cout, kh, kw, stride, pad) in [(2, 7, 9, 3, 5, 3, 3, 1, 1), (1, 7, 9, 5, 7, 3, 3, 2, 1), (1, 5, 6, 4, 3, 2, 3, 2, 0)]:
        oh = (h + 2*pad - kh)//stride + 1; ow = (w + 2*pad - kw)//stride + 1
        x = rnd(B*h*w*cin); wt = rnd(kh*kw*cin*cout); bias = rnd(cout)
        m = B*oh*ow; out = [0.0]*(m*cout)
        run(ConvA(x, h, w, cin, kh, kw, stride, pad, oh, ow, m), dict(b=wt, n=cout, k=kh*kw*cin, kn=True),
            dict(m=m, n=cout, alpha=1.0, beta=0.0, bias=bias), out, tc)
        want = conv_ref(x, wt, bias, B, h, w, cin, cout, kh, kw, stride, pad, [(b, p) for b in range(B) for p in range(oh*ow)],
                        lambda mp, pos, ci: x[(mp*h*w+pos)*cin+ci])
        check(f"{'tf32' if tc else 'simt'} conv {B}x{h}x{w}x{cin}->{cout} {kh}x{kw}/{stride} p{pad}", out, want)

# masked: two segments
h, w, cin, cout, stride = 7, 9, 4, 5, 2
oh = (h + 2 - 3)//stride + 1; ow = (w + 2 - 3)//stride + 1
fresh, cached, row_of, rows, act = [], [], [], [], []
for sgi in range(2):
    active = sorted(R.sample(range(h*w), 20)); ro = [MASK]*(h*w)
    for i, p in enumerate(active): ro[p] = i
    fresh.append(rnd(len(active)*cin)); cached.append(rnd(h*w*cin)); row_of += ro
    outs = sorted(R.sample(range(oh*ow), 7)); rows += [v for p in outs for v in (sgi, p)]
m = len(rows)//2; wt = rnd(9*cin*cout); out = [0.0]*(m*cout)
run(MaskedA(fresh, cached, row_of, rows, h, w, cin, 3, 3, stride, 1, ow, m), dict(b=wt, n=cout, k=9*cin, kn=True),
    dict(m=m, n=cout, alpha=1.0, beta=0.0, bias=None), out, False)
def getin(mp, pos, ci):
    fr = row_of[mp*h*w+pos]
    return fresh[mp][fr*cin+ci] if fr != MASK else cached[mp][pos*cin+ci]
want = conv_ref(None, wt, None, 2, h, w, cin, cout, 3, 3, stride, 1, [(rows[2*r], rows[2*r+1]) for r in range(m)], getin)
check("simt masked conv 2 seg", out, want)
