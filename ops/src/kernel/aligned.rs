//! [`AlignedVec`]: a zero-initialized buffer of numbers whose first element is 64-byte aligned,
//! for AMX tile loads and stores (a tile row that straddles two cache lines costs two line
//! accesses; measured on the dev box, misaligned bf16 tile operands made `tdpbf16ps` loops
//! 3-4x slower) and aligned zmm access.

/// A zero-initialized `[T]` of fixed length starting on a 64-byte boundary. `T` is a plain
/// number type (`u8`, `u16`, `u32`, `f32`, ...): its size divides 64 and all-zero bits are 0.
pub struct AlignedVec<T> {
    storage: Vec<T>,
    offset: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedVec<T> {
    pub fn zeroed(len: usize) -> Self {
        let size = size_of::<T>();
        assert!(size > 0 && 64 % size == 0, "AlignedVec needs an element size that divides 64");
        let storage = vec![T::default(); len + 64 / size];
        // The allocation is aligned to size_of::<T>() for number types, so the distance to the
        // next 64-byte boundary is a whole number of elements.
        let offset = (64 - storage.as_ptr() as usize % 64) % 64 / size;
        Self { storage, offset, len }
    }

    pub fn as_slice(&self) -> &[T] {
        &self.storage[self.offset..self.offset + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedVec;

    #[test]
    fn starts_on_a_64_byte_boundary() {
        for len in [0, 1, 17, 1000] {
            let mut a = AlignedVec::<u16>::zeroed(len);
            assert_eq!(a.as_slice().len(), len);
            assert!(a.as_slice().iter().all(|&x| x == 0));
            assert_eq!(a.as_mut_slice().as_ptr() as usize % 64, 0, "len {len}");
            let f = AlignedVec::<f32>::zeroed(len);
            assert_eq!(f.as_slice().as_ptr() as usize % 64, 0, "len {len}");
        }
    }
}
