//! RFC 6962 (RFC 9162 §2.1) Merkle tree hashing, compact ranges, and proofs.
//!
//! This module is shared by the writer (the store) and by every verifier, so it is pure: nodes are
//! read through [`NodeReader`], which the store backs with tiles on disk and tests back with a
//! vector of leaves.

use sha2::{Digest, Sha256};

/// A SHA-256 output: a leaf hash, an interior node, or a root.
pub type Hash = [u8; 32];

/// The root of the empty tree: `SHA-256("")`, not 32 zero bytes.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly less than `n` (`n >= 2`): where RFC 6962 splits a range.
pub fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// The Merkle tree hash of a list of leaf hashes, by the RFC's recursion. O(n); used for small
/// ranges (inside one tile) and as the reference that faster code is tested against.
pub fn root_of(leaf_hashes: &[Hash]) -> Hash {
    match leaf_hashes.len() {
        0 => EMPTY_ROOT,
        1 => leaf_hashes[0],
        n => {
            let k = split_point(n as u64) as usize;
            node_hash(&root_of(&leaf_hashes[..k]), &root_of(&leaf_hashes[k..]))
        }
    }
}

/// The right edge of a tree: the roots of its perfect subtrees, largest first. Appending a leaf
/// costs amortised one node hash; the root costs one hash per set bit of the size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// One hash per set bit of `size`, from the most significant bit down.
    peaks: Vec<Hash>,
}

impl CompactRange {
    pub fn new() -> CompactRange {
        CompactRange::default()
    }

    /// Builds the right edge of a tree of `size` leaves from its perfect subtree roots, largest
    /// first (as returned by [`CompactRange::peaks`]).
    pub fn from_peaks(size: u64, peaks: Vec<Hash>) -> CompactRange {
        assert_eq!(peaks.len(), size.count_ones() as usize, "one peak per set bit of the size");
        CompactRange { size, peaks }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    pub fn append(&mut self, leaf_hash: Hash) {
        let mut hash = leaf_hash;
        // Each trailing one bit of the old size is a peak of the same height as the carry.
        let mut merges = self.size.trailing_ones();
        while merges > 0 {
            let left = self.peaks.pop().expect("a peak per set bit");
            hash = node_hash(&left, &hash);
            merges -= 1;
        }
        self.peaks.push(hash);
        self.size += 1;
    }

    pub fn root(&self) -> Hash {
        let mut peaks = self.peaks.iter().rev();
        let Some(first) = peaks.next() else { return EMPTY_ROOT };
        peaks.fold(*first, |acc, left| node_hash(left, &acc))
    }
}

/// Reads the root of a perfect subtree: `level` is its height (0 = a leaf hash) and `index` its
/// position among the subtrees of that height. Only subtrees fully inside the tree are asked for.
pub trait NodeReader {
    type Error;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// The root of the leaves `[lo, hi)`, reading perfect subtrees where the range is aligned.
pub fn range_root<R: NodeReader>(reader: &R, lo: u64, hi: u64) -> Result<Hash, R::Error> {
    debug_assert!(lo < hi);
    let n = hi - lo;
    if n.is_power_of_two() && lo.is_multiple_of(n) {
        return reader.node(n.trailing_zeros(), lo / n);
    }
    let k = split_point(n);
    Ok(node_hash(&range_root(reader, lo, lo + k)?, &range_root(reader, lo + k, hi)?))
}

/// The root of a tree of `size` leaves.
pub fn tree_root<R: NodeReader>(reader: &R, size: u64) -> Result<Hash, R::Error> {
    if size == 0 { Ok(EMPTY_ROOT) } else { range_root(reader, 0, size) }
}

/// RFC 6962 §2.1.1 `PATH(index, D[0:size])`: the inclusion proof of leaf `index`, sibling first.
pub fn inclusion_proof<R: NodeReader>(
    reader: &R,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, R::Error> {
    assert!(index < size, "inclusion proof of leaf {index} in a tree of {size}");
    let mut proof = Vec::new();
    path(reader, index, 0, size, &mut proof)?;
    Ok(proof)
}

fn path<R: NodeReader>(
    reader: &R,
    index: u64,
    lo: u64,
    hi: u64,
    proof: &mut Vec<Hash>,
) -> Result<(), R::Error> {
    if hi - lo == 1 {
        return Ok(());
    }
    let k = split_point(hi - lo);
    if index < lo + k {
        path(reader, index, lo, lo + k, proof)?;
        proof.push(range_root(reader, lo + k, hi)?);
    } else {
        path(reader, index, lo + k, hi, proof)?;
        proof.push(range_root(reader, lo, lo + k)?);
    }
    Ok(())
}

/// RFC 6962 §2.1.2 `PROOF(old, D[0:new])`: the consistency proof between two tree sizes.
pub fn consistency_proof<R: NodeReader>(
    reader: &R,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, R::Error> {
    assert!(old_size <= new_size, "consistency from {old_size} to {new_size}");
    let mut proof = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof(reader, old_size, 0, new_size, true, &mut proof)?;
    }
    Ok(proof)
}

fn subproof<R: NodeReader>(
    reader: &R,
    m: u64,
    lo: u64,
    hi: u64,
    complete: bool,
    proof: &mut Vec<Hash>,
) -> Result<(), R::Error> {
    let n = hi - lo;
    if m == n {
        if !complete {
            proof.push(range_root(reader, lo, hi)?);
        }
        return Ok(());
    }
    let k = split_point(n);
    if m <= k {
        subproof(reader, m, lo, lo + k, complete, proof)?;
        proof.push(range_root(reader, lo + k, hi)?);
    } else {
        subproof(reader, m - k, lo + k, hi, false, proof)?;
        proof.push(range_root(reader, lo, lo + k)?);
    }
    Ok(())
}

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not inside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("proof has {got} hashes, expected {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("proof does not lead to the expected root")]
    RootMismatch,
    #[error("old tree size {old} is larger than new tree size {new}")]
    SizesReversed { old: u64, new: u64 },
}

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let expected = inclusion_proof_len(index, size);
    if proof.len() != expected {
        return Err(ProofError::WrongLength { got: proof.len(), expected });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 || r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

fn inclusion_proof_len(index: u64, size: u64) -> usize {
    // Length of PATH: the number of levels from the leaf to the root along its path.
    let (mut lo, mut hi, mut len) = (0u64, size, 0usize);
    while hi - lo > 1 {
        let k = split_point(hi - lo);
        if index < lo + k {
            hi = lo + k
        } else {
            lo += k
        }
        len += 1;
    }
    len
}

/// Verifies a consistency proof (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesReversed { old: old_size, new: new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength { got: proof.len(), expected: 0 });
        }
        return if old_root == new_root { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if old_size == 0 {
        // Every tree is consistent with the empty tree; the proof is empty.
        if !proof.is_empty() {
            return Err(ProofError::WrongLength { got: proof.len(), expected: 0 });
        }
        return if *old_root == EMPTY_ROOT { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    if path.is_empty() {
        return Err(ProofError::WrongLength { got: 0, expected: 1 });
    }
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return Err(ProofError::WrongLength { got: proof.len(), expected: proof.len() - 1 });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 || fr != *old_root || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// A [`NodeReader`] over leaf hashes held in memory: the reference for tests and small trees.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    pub leaf_hashes: Vec<Hash>,
}

impl NodeReader for MemoryTree {
    type Error = std::convert::Infallible;
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error> {
        let width = 1usize << level;
        let lo = index as usize * width;
        Ok(root_of(&self.leaf_hashes[lo..lo + width]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 6962 PATH by the RFC's own recursion over leaf hashes: the naive reference.
    fn naive_path(m: usize, d: &[Hash]) -> Vec<Hash> {
        if d.len() <= 1 {
            return vec![];
        }
        let k = split_point(d.len() as u64) as usize;
        if m < k {
            let mut p = naive_path(m, &d[..k]);
            p.push(root_of(&d[k..]));
            p
        } else {
            let mut p = naive_path(m - k, &d[k..]);
            p.push(root_of(&d[..k]));
            p
        }
    }

    /// RFC 6962 SUBPROOF by the RFC's own recursion.
    fn naive_subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![root_of(d)] };
        }
        let k = split_point(n as u64) as usize;
        if m <= k {
            let mut p = naive_subproof(m, &d[..k], b);
            p.push(root_of(&d[k..]));
            p
        } else {
            let mut p = naive_subproof(m - k, &d[k..], false);
            p.push(root_of(&d[..k]));
            p
        }
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&(i as u64).to_be_bytes())).collect()
    }

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        assert_eq!(EMPTY_ROOT, <[u8; 32]>::from(Sha256::digest(b"")));
        assert_eq!(CompactRange::new().root(), EMPTY_ROOT);
    }

    proptest! {
        #[test]
        fn compact_range_matches_naive_root(n in 0usize..600) {
            let d = leaves(n);
            let mut cr = CompactRange::new();
            for h in &d { cr.append(*h); }
            prop_assert_eq!(cr.root(), root_of(&d));
            let tree = MemoryTree { leaf_hashes: d.clone() };
            prop_assert_eq!(tree_root(&tree, n as u64).unwrap(), root_of(&d));
        }

        #[test]
        fn inclusion_matches_naive_and_verifies(n in 1usize..300, seed in any::<u64>()) {
            let d = leaves(n);
            let m = (seed % n as u64) as usize;
            let tree = MemoryTree { leaf_hashes: d.clone() };
            let proof = inclusion_proof(&tree, m as u64, n as u64).unwrap();
            prop_assert_eq!(&proof, &naive_path(m, &d));
            let root = root_of(&d);
            prop_assert_eq!(verify_inclusion(&d[m], m as u64, n as u64, &proof, &root), Ok(()));
            // Any other leaf, index or root must fail.
            let other = leaf_hash(b"other");
            prop_assert!(verify_inclusion(&other, m as u64, n as u64, &proof, &root).is_err());
            if n > 1 {
                let wrong = (m as u64 + 1) % n as u64;
                prop_assert!(verify_inclusion(&d[m], wrong, n as u64, &proof, &root).is_err() || d[m] == d[wrong as usize]);
                let mut bad = proof.clone();
                bad[0][0] ^= 1;
                prop_assert!(verify_inclusion(&d[m], m as u64, n as u64, &bad, &root).is_err());
            }
        }

        #[test]
        fn consistency_matches_naive_and_verifies(n in 1usize..300, seed in any::<u64>()) {
            let d = leaves(n);
            let m = 1 + (seed % n as u64) as usize;
            let tree = MemoryTree { leaf_hashes: d.clone() };
            let proof = consistency_proof(&tree, m as u64, n as u64).unwrap();
            let naive = if m == n { vec![] } else { naive_subproof(m, &d, true) };
            prop_assert_eq!(&proof, &naive);
            let (old_root, new_root) = (root_of(&d[..m]), root_of(&d));
            prop_assert_eq!(verify_consistency(m as u64, n as u64, &old_root, &new_root, &proof), Ok(()));
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let last = bad.len() - 1;
                bad[last][3] ^= 0x80;
                prop_assert!(verify_consistency(m as u64, n as u64, &old_root, &new_root, &bad).is_err());
            }
            prop_assert!(verify_consistency(m as u64, n as u64, &leaf_hash(b"x"), &new_root, &proof).is_err());
        }
    }
}
