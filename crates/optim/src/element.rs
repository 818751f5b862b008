//! Parameter and gradient element types (f32, bf16, f16) and dtype-tagged slices.

use half::{bf16, f16};

/// A floating-point element type a parameter or gradient may have.
///
/// Conversions follow CUDA's `(float)x` and `(T)f` casts: widening is exact, narrowing rounds to
/// nearest with ties to even (`__float2bfloat16`, `__float2half_rn`), exactly what `half` does.
pub trait Element: Copy + Send + Sync + 'static + private::Sealed {
    /// The dtype tag.
    const DTYPE: Dtype;
    /// Widen to f32 (exact).
    fn to_f32(self) -> f32;
    /// Round an f32 to this type (round to nearest, ties to even).
    fn from_f32(x: f32) -> Self;
    /// The slice itself when `Self` is f32 (so f32 data can be used without a copy).
    #[inline(always)]
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The element type of a parameter or gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// A mutable parameter (or gradient) slice tagged with its dtype.
#[derive(Debug)]
pub enum TensorMut<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// bf16 elements.
    Bf16(&'a mut [bf16]),
    /// f16 elements.
    F16(&'a mut [f16]),
}

/// A read-only gradient (or parameter) slice tagged with its dtype.
#[derive(Debug, Clone, Copy)]
pub enum TensorRef<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
}

impl TensorMut<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorMut::F32(s) => s.len(),
            TensorMut::Bf16(s) => s.len(),
            TensorMut::F16(s) => s.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        match self {
            TensorMut::F32(_) => Dtype::F32,
            TensorMut::Bf16(_) => Dtype::Bf16,
            TensorMut::F16(_) => Dtype::F16,
        }
    }
    /// A read-only view.
    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            TensorMut::F32(s) => TensorRef::F32(s),
            TensorMut::Bf16(s) => TensorRef::Bf16(s),
            TensorMut::F16(s) => TensorRef::F16(s),
        }
    }
    /// Reborrow for a shorter lifetime.
    pub fn reborrow(&mut self) -> TensorMut<'_> {
        match self {
            TensorMut::F32(s) => TensorMut::F32(s),
            TensorMut::Bf16(s) => TensorMut::Bf16(s),
            TensorMut::F16(s) => TensorMut::F16(s),
        }
    }
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(s) => s.len(),
            TensorRef::Bf16(s) => s.len(),
            TensorRef::F16(s) => s.len(),
        }
    }
    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        match self {
            TensorRef::F32(_) => Dtype::F32,
            TensorRef::Bf16(_) => Dtype::Bf16,
            TensorRef::F16(_) => Dtype::F16,
        }
    }
}

impl<'a> From<&'a mut [f32]> for TensorMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        TensorMut::F32(s)
    }
}
impl<'a> From<&'a mut [bf16]> for TensorMut<'a> {
    fn from(s: &'a mut [bf16]) -> Self {
        TensorMut::Bf16(s)
    }
}
impl<'a> From<&'a mut [f16]> for TensorMut<'a> {
    fn from(s: &'a mut [f16]) -> Self {
        TensorMut::F16(s)
    }
}
impl<'a> From<&'a [f32]> for TensorRef<'a> {
    fn from(s: &'a [f32]) -> Self {
        TensorRef::F32(s)
    }
}
impl<'a> From<&'a [bf16]> for TensorRef<'a> {
    fn from(s: &'a [bf16]) -> Self {
        TensorRef::Bf16(s)
    }
}
impl<'a> From<&'a [f16]> for TensorRef<'a> {
    fn from(s: &'a [f16]) -> Self {
        TensorRef::F16(s)
    }
}
