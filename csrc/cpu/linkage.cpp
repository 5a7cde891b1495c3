// Average linkage (UPGMA) with the nearest-neighbour chain (Muellner 2011, arXiv:1109.2378,
// "NN-chain-linkage"), following the steps of scipy.cluster.hierarchy's nn_chain, on a square
// matrix so that every scan of a cluster's distances is one contiguous row.
//
// The [M, M] input is the working matrix (the caller gives up its contents); it is first made
// exactly symmetric from its upper triangle, which is what scipy reads. Slot i holds one active
// cluster; a merge of slots x < y keeps the new cluster in y and retires x. The nearest-neighbour
// scan is a branch-free vectorised min over the row plus a mask (+inf for retired slots; the
// diagonal is +inf). The Lance-Williams update rewrites row y contiguously; column y is not
// written (that would be one cache and TLB miss per active row and merge, which dominates an
// eager implementation on a large matrix): rows are refreshed lazily, see Chain. Whenever at
// most half the slots are active, the matrix is compacted in place to the active slots (in
// order, so ties still resolve to the lowest original index as in scipy) and made symmetric
// again, which keeps rows short and the working set shrinking; O(M^2) work in total.
//
// The update (nx * d(x, i) + ny * d(y, i)) / (nx + ny) is evaluated with scipy's operations in
// scipy's order, without FMA contraction, and ties go to the previous chain element and then to
// the lowest index, as in scipy: the merges, and so the final linkage matrix, match scipy's
// bit for bit (scipy's x86-64 wheels evaluate the update without FMA too).
//
// Finally, as scipy does, the merges are stable-sorted by height and relabelled with a union-find
// (new cluster of row i gets id M + i; each row lists the smaller id first).
#include "common/vector_math.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "common/ops.h"

namespace eac {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Row scans take the minimum of each block of kScanBlock entries (vectorised), and look for the
// first position of the minimum only in the block where it first occurs.
constexpr int64_t kScanBlock = 256;
// Compact the matrix when at most half of its slots are active, once it has at least this many.
constexpr int64_t kMinCompactSlots = 256;
// Tile side of symmetrize().
constexpr int64_t kSymTile = 64;

// Lowest index i of the minimum of row[i] + mask[i] over [0, n), and that minimum; -1 when every
// entry is +inf. mask is 0 for an active slot and +inf for a retired one.
int64_t row_argmin(const double* __restrict row, const double* __restrict mask, int64_t n,
                   double* min_out) {
  constexpr int kLanes = 8;
  double best = kInf;
  int64_t best_block = -1;
  for (int64_t b = 0; b < n; b += kScanBlock) {
    const int64_t e = std::min(n, b + kScanBlock);
    double lane[kLanes];
    for (int l = 0; l < kLanes; ++l) lane[l] = kInf;
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const double v = row[i + l] + mask[i + l];
        lane[l] = v < lane[l] ? v : lane[l];
      }
    }
    double bm = kInf;
    for (int l = 0; l < kLanes; ++l) bm = lane[l] < bm ? lane[l] : bm;
    for (; i < e; ++i) {
      const double v = row[i] + mask[i];
      bm = v < bm ? v : bm;
    }
    if (bm < best) {  // strict: an equal minimum in a later block does not count
      best = bm;
      best_block = b;
    }
  }
  *min_out = best;
  if (best_block < 0) return -1;
  for (int64_t i = best_block;; ++i)
    if (row[i] + mask[i] == best) return i;
}

// Lance-Williams update for average linkage, written exactly as scipy evaluates it (no FMA
// contraction, division by the integer sum of sizes), over a whole row: row_y[i] becomes
// d(x u y, i). Retired entries and the diagonal stay +inf (sizes are >= 1), and row_y[x] becomes
// +inf because row_x[x] is.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void average_update(const double* __restrict row_x, double* __restrict row_y, int64_t n,
                    double nx, double ny) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const double nxy = nx + ny;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) row_y[i] = (nx * row_x[i] + ny * row_y[i]) / nxy;
}

// Make the [s, s] matrix symmetric, tile pair by tile pair. For i < j the value kept is row(j)[i]
// when born[j] > fresh[i] (row j is the newer one, see Chain), else row(i)[j]; with all times 0
// (the input) that is scipy's reading of the upper triangle. The lower tile of a pair is read
// and written back by rows (contiguous runs) through a transposed copy in L1, and only rows that
// changed are written, so an already symmetric input is only read.
void symmetrize(double* d, int64_t s, const int64_t* born, const int64_t* fresh) {
  constexpr int64_t T = kSymTile;
  const int64_t n_tiles = (s + T - 1) / T;
#pragma omp parallel if (s >= 2 * T) num_threads(kernel_threads())
  {
    double lo[T][T];  // lo[ii][jj] = d[(j0 + jj) * s + i0 + ii]: the lower tile, transposed
    bool dirty[T];
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      const int64_t i0 = ti * T, ni = std::min(T, s - i0);
      for (int64_t j0 = i0; j0 < s; j0 += T) {
        const int64_t nj = std::min(T, s - j0);
        const bool diag = j0 == i0;  // the diagonal tile: pairs j > i only
        for (int64_t jj = 0; jj < nj; ++jj) {
          const double* src = d + (j0 + jj) * s + i0;
          for (int64_t ii = 0; ii < ni; ++ii) lo[ii][jj] = src[ii];
          dirty[jj] = false;
        }
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t i = i0 + ii;
          double* up = d + i * s + j0;
          const int64_t jj0 = diag ? ii + 1 : 0;
          bool same = true;  // vectorised test first: usually there is nothing to do
#pragma omp simd reduction(&& : same)
          for (int64_t jj = jj0; jj < nj; ++jj) same = same && up[jj] == lo[ii][jj];
          if (same) continue;
          for (int64_t jj = jj0; jj < nj; ++jj) {
            if (up[jj] == lo[ii][jj]) continue;
            if (born[j0 + jj] > fresh[i]) {
              up[jj] = lo[ii][jj];
            } else {
              lo[ii][jj] = up[jj];
              dirty[jj] = true;
            }
          }
        }
        for (int64_t jj = 0; jj < nj; ++jj) {
          if (!dirty[jj]) continue;
          double* dst = d + (j0 + jj) * s + i0;
          const int64_t ii1 = diag ? jj : ni;  // below the diagonal only
          for (int64_t ii = 0; ii < ii1; ++ii) dst[ii] = lo[ii][jj];
        }
      }
    }
  }
}

// The working state: `s` slots, matrix rows of stride s.
//
// Symmetry is restored lazily. Time counts merges; born[b] is when the cluster in slot b was
// formed (0 for a leaf) and fresh[a] when row a was last made complete. The distance between
// active a and b is row(a)[b] when born[b] <= fresh[a], otherwise row(b)[a] (row b was computed
// after row a was complete, from up-to-date rows, and neither cluster changed since). Before a
// row is scanned or merged, refresh() copies in the entries that changed since it was complete.
// This reads only the entries of rows actually used, instead of writing column y of every active
// row at every merge, which is where an eager update spends its time on a large matrix.
struct Chain {
  double* d;
  int64_t s;
  std::vector<int64_t> orig;     // slot -> original index of the cluster's representative leaf
  std::vector<int64_t> size;     // slot -> cluster size, 0 once retired
  std::vector<double> mask;      // slot -> 0 while active, +inf once retired
  std::vector<int64_t> born;     // slot -> merge count when its cluster was formed
  std::vector<int64_t> fresh;    // slot -> merge count when its row was last complete
  std::vector<int64_t> log;      // log[t] = slot of the cluster formed by merge t (-1: retired)
  std::vector<int64_t> act;      // active slots, in no particular order
  std::vector<int64_t> pos;      // slot -> position in act
  std::vector<int64_t> chain;    // the nearest-neighbour chain (slots)
  std::vector<int64_t> remap;    // scratch for compaction
  std::vector<int64_t> scratch;  // stale columns in refresh()
  int64_t n_act = 0, chain_len = 0;
  int64_t now = 0;    // merges done
  int64_t first = 0;  // no active slot below this one

  Chain(double* dist, int64_t m)
      : d(dist),
        s(m),
        orig(m),
        size(m, 1),
        mask(m, 0.0),
        born(m, 0),
        fresh(m, 0),
        log(m - 1, -1),
        act(m),
        pos(m),
        chain(m),
        remap(m),
        scratch(m),
        n_act(m) {
    std::iota(orig.begin(), orig.end(), int64_t(0));
    std::iota(act.begin(), act.end(), int64_t(0));
    std::iota(pos.begin(), pos.end(), int64_t(0));
    symmetrize(d, m, born.data(), fresh.data());
    for (int64_t i = 0; i < m; ++i) d[i * m + i] = kInf;
  }

  double* row(int64_t i) const { return d + i * s; }

  // Bring row x up to date: row(x)[b] = row(b)[x] for every active b formed since fresh[x].
  // Walks the log since then, or the active list when that is shorter.
  void refresh(int64_t x) {
    const int64_t since = fresh[x];
    if (since == now) return;
    // Collect the stale columns without branches, then gather them: the loads are independent
    // cache misses and overlap (a data-dependent branch per entry would serialise them).
    int64_t* stale = scratch.data();
    int64_t n_stale = 0;
    if (now - since <= n_act) {
      for (int64_t t = since; t < now; ++t) {
        const int64_t b = log[t];
        stale[n_stale] = b;
        n_stale += b >= 0 && born[b] == t + 1 && size[b] > 0;
      }
    } else {
      for (int64_t q = 0; q < n_act; ++q) {
        const int64_t b = act[q];
        stale[n_stale] = b;
        n_stale += born[b] > since;
      }
    }
    // Serial on purpose: an OpenMP region per refresh pays off only by ~10% on an idle machine
    // and costs ~3x when the other core is busy (each region then waits for a descheduled
    // worker).
    double* rx = row(x);
    for (int64_t q = 0; q < n_stale; ++q) rx[stale[q]] = d[stale[q] * s + x];
    fresh[x] = now;
  }

  // Keep only the active slots, in increasing order, as a [n_act, n_act] matrix at the start of
  // the buffer. In place: the entry (r, c) moves from keep[r] * s + keep[c] to r * n_act + c,
  // which is never after where it was, and entries are moved in increasing order of both.
  // Then every row is made complete (symmetrize), so later refreshes start from scratch.
  void compact() {
    const int64_t a = n_act;
    int64_t* keep = act.data();  // rebuilt below as the identity
    for (int64_t i = 0, r = 0; i < s; ++i) {
      remap[i] = size[i] > 0 ? r : -1;
      if (size[i] > 0) keep[r++] = i;
    }
    for (int64_t r = 0; r < a; ++r) {
      const double* src = d + keep[r] * s;
      double* dst = d + r * a;
      for (int64_t c = 0; c < a; ++c) dst[c] = src[keep[c]];
    }
    for (int64_t q = 0; q < chain_len; ++q) chain[q] = remap[chain[q]];
    for (int64_t t = 0; t < now; ++t)
      if (log[t] >= 0) log[t] = remap[log[t]];
    for (int64_t r = 0; r < a; ++r) {
      const int64_t i = keep[r];
      orig[r] = orig[i];
      size[r] = size[i];
      born[r] = born[i];
      fresh[r] = fresh[i];
      mask[r] = 0.0;
      act[r] = r;
      pos[r] = r;
    }
    s = a;
    first = 0;
    symmetrize(d, s, born.data(), fresh.data());
    std::fill_n(fresh.begin(), a, now);
  }

  // Follow the chain until its last two elements are reciprocal nearest neighbours; return them
  // (x: last, y: the one before) and their distance. Ties go to the previous chain element,
  // then to the lowest slot (scipy's rule).
  void find_pair(int64_t* x_out, int64_t* y_out, double* h_out) {
    if (chain_len == 0) {
      while (size[first] == 0) ++first;
      chain[chain_len++] = first;
    }
    for (;;) {
      const int64_t x = chain[chain_len - 1];
      refresh(x);
      const double* rx = row(x);
      double h;
      int64_t y = row_argmin(rx, mask.data(), s, &h);
      if (chain_len > 1 && rx[chain[chain_len - 2]] <= h) {
        *x_out = x;
        *y_out = chain[chain_len - 2];
        *h_out = rx[chain[chain_len - 2]];
        chain_len -= 2;
        return;
      }
      if (y < 0) {  // only +inf distances (not reachable with finite input): take any other
        y = act[0] != x ? act[0] : act[1];
        h = rx[y];
      }
      // A chain of distinct clusters is never longer than n_act; it can only cycle on NaN.
      if (chain_len == n_act)
        throw std::invalid_argument("average_linkage: dist must not contain NaN");
      chain[chain_len++] = y;
    }
  }

  // Merge slots x < y into y; return the new size.
  int64_t merge(int64_t x, int64_t y) {
    refresh(x);  // no-ops but for the element below the top of the chain
    refresh(y);
    const int64_t nx = size[x], ny = size[y];
    average_update(row(x), row(y), s, static_cast<double>(nx), static_cast<double>(ny));
    size[x] = 0;
    mask[x] = kInf;
    const int64_t p = pos[x], last = act[--n_act];  // swap-remove x from the active list
    act[p] = last;
    pos[last] = p;
    size[y] = nx + ny;
    log[now++] = y;
    born[y] = fresh[y] = now;
    return nx + ny;
  }
};

// scipy's relabelling of the height-sorted merges: ids follow scipy's convention.
void label(double* z, int64_t m) {
  std::vector<int64_t> parent(2 * m - 1), size(2 * m - 1, 1);
  std::iota(parent.begin(), parent.end(), int64_t(0));
  auto find = [&parent](int64_t x) {
    int64_t root = x;
    while (parent[root] != root) root = parent[root];
    while (parent[x] != root) {  // path compression
      const int64_t next = parent[x];
      parent[x] = root;
      x = next;
    }
    return root;
  };
  for (int64_t i = 0; i < m - 1; ++i) {
    const int64_t a = find(static_cast<int64_t>(z[4 * i]));
    const int64_t b = find(static_cast<int64_t>(z[4 * i + 1]));
    const int64_t id = m + i;
    parent[a] = id;
    parent[b] = id;
    size[id] = size[a] + size[b];
    z[4 * i] = static_cast<double>(std::min(a, b));
    z[4 * i + 1] = static_cast<double>(std::max(a, b));
    z[4 * i + 3] = static_cast<double>(size[id]);
  }
}

}  // namespace

void average_linkage_cpu(double* dist, int64_t m, double* z) {
  if (m < 2) throw std::invalid_argument("average_linkage: need at least 2 observations");
  if (!dist || !z) throw std::invalid_argument("average_linkage: null pointer");

  // Merges in the order the chain finds them: (representative leaf of x, of y, height, size).
  std::vector<double> merges(static_cast<size_t>(4 * (m - 1)));
  {
    Chain c(dist, m);
    for (int64_t k = 0; k < m - 1; ++k) {
      if (2 * c.n_act <= c.s && c.s >= kMinCompactSlots) c.compact();
      int64_t x, y;
      double h;
      c.find_pair(&x, &y, &h);
      if (x > y) std::swap(x, y);
      const int64_t ox = c.orig[x], oy = c.orig[y];
      const int64_t n_new = c.merge(x, y);
      merges[4 * k] = static_cast<double>(ox);
      merges[4 * k + 1] = static_cast<double>(oy);
      merges[4 * k + 2] = h;
      merges[4 * k + 3] = static_cast<double>(n_new);
    }
  }

  // Stable sort by height (scipy: argsort(kind="mergesort")), then relabel.
  std::vector<int64_t> order(m - 1);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&merges](int64_t a, int64_t b) {
    return merges[4 * a + 2] < merges[4 * b + 2];
  });
  for (int64_t i = 0; i < m - 1; ++i) std::copy_n(merges.begin() + 4 * order[i], 4, z + 4 * i);
  label(z, m);
}

}  // namespace eac
