//! The little of `core` the kernels need, as lang items (the nvptx target ships no `core`).
//!
//! Only what the kernels use is here: marker traits, the operators on the primitive types,
//! comparisons, and the panic entry points the compiler may call (division by zero, array
//! bounds), which trap. Arrays index with `usize` (the GEMM's register tiles, always with
//! indices LLVM unrolls to constants); there is no `for`, so no `Iterator` machinery.

#[lang = "pointee_sized"]
pub trait PointeeSized {}

#[lang = "meta_sized"]
pub trait MetaSized: PointeeSized {}

#[lang = "sized"]
pub trait Sized: MetaSized {}

#[lang = "copy"]
pub trait Copy {}

#[lang = "legacy_receiver"]
pub trait LegacyReceiver {}
impl<T: ?Sized> LegacyReceiver for &T {}
impl<T: ?Sized> LegacyReceiver for &mut T {}

#[lang = "freeze"]
pub unsafe auto trait Freeze {}

macro_rules! copy_impls {
    ($($t:ty)*) => { $( impl Copy for $t {} )* };
}
copy_impls!(bool u8 u16 u32 u64 usize i32 i64 f16 f32 f64);
impl<T: ?Sized> Copy for *const T {}
impl<T: ?Sized> Copy for *mut T {}
impl<T: ?Sized> Copy for &T {}
impl<T: Copy, const N: usize> Copy for [T; N] {}

macro_rules! binop {
    ($lang:literal $trait:ident $method:ident $op:tt; $($t:ty)*) => {
        #[lang = $lang]
        pub trait $trait<Rhs = Self> {
            type Output;
            fn $method(self, rhs: Rhs) -> Self::Output;
        }
        $( impl $trait for $t {
            type Output = $t;
            #[inline(always)]
            fn $method(self, rhs: $t) -> $t { self $op rhs }
        } )*
    };
}
binop!("add" Add add +; u32 u64 usize i32 f32);
binop!("sub" Sub sub -; u32 u64 usize i32 f32);
binop!("mul" Mul mul *; u32 u64 usize i32 f32);
binop!("div" Div div /; u32 u64 usize f32);
binop!("rem" Rem rem %; u32 usize);
binop!("bitand" BitAnd bitand &; u32 u16 bool);
binop!("bitor" BitOr bitor |; u32 u16 bool);

macro_rules! shift {
    ($lang:literal $trait:ident $method:ident $op:tt; $($t:ty)*) => {
        #[lang = $lang]
        pub trait $trait<Rhs = Self> {
            type Output;
            fn $method(self, rhs: Rhs) -> Self::Output;
        }
        $( impl $trait<u32> for $t {
            type Output = $t;
            #[inline(always)]
            fn $method(self, rhs: u32) -> $t { self $op rhs }
        } )*
    };
}
shift!("shl" Shl shl <<; u32);
shift!("shr" Shr shr >>; u32);

macro_rules! assignop {
    ($lang:literal $trait:ident $method:ident $op:tt; $($t:ty)*) => {
        #[lang = $lang]
        pub trait $trait<Rhs = Self> {
            fn $method(&mut self, rhs: Rhs);
        }
        $( impl $trait for $t {
            #[inline(always)]
            fn $method(&mut self, rhs: $t) { *self $op rhs; }
        } )*
    };
}
assignop!("add_assign" AddAssign add_assign +=; u32 usize f32);
assignop!("sub_assign" SubAssign sub_assign -=; u32 f32);
assignop!("mul_assign" MulAssign mul_assign *=; u32 f32);

#[lang = "neg"]
pub trait Neg {
    type Output;
    fn neg(self) -> Self::Output;
}
impl Neg for f32 {
    type Output = f32;
    #[inline(always)]
    fn neg(self) -> f32 {
        -self
    }
}

#[lang = "not"]
pub trait Not {
    type Output;
    fn not(self) -> Self::Output;
}
impl Not for bool {
    type Output = bool;
    #[inline(always)]
    fn not(self) -> bool {
        !self
    }
}

#[lang = "eq"]
pub trait PartialEq<Rhs: ?Sized = Self> {
    fn eq(&self, other: &Rhs) -> bool;
    fn ne(&self, other: &Rhs) -> bool;
}

#[lang = "partial_ord"]
pub trait PartialOrd<Rhs: ?Sized = Self>: PartialEq<Rhs> {
    fn lt(&self, other: &Rhs) -> bool;
    fn le(&self, other: &Rhs) -> bool;
    fn gt(&self, other: &Rhs) -> bool;
    fn ge(&self, other: &Rhs) -> bool;
}

macro_rules! cmp_impls {
    ($($t:ty)*) => { $(
        impl PartialEq for $t {
            #[inline(always)]
            fn eq(&self, o: &$t) -> bool { *self == *o }
            #[inline(always)]
            fn ne(&self, o: &$t) -> bool { *self != *o }
        }
        impl PartialOrd for $t {
            #[inline(always)]
            fn lt(&self, o: &$t) -> bool { *self < *o }
            #[inline(always)]
            fn le(&self, o: &$t) -> bool { *self <= *o }
            #[inline(always)]
            fn gt(&self, o: &$t) -> bool { *self > *o }
            #[inline(always)]
            fn ge(&self, o: &$t) -> bool { *self >= *o }
        }
    )* };
}
cmp_impls!(u32 u64 usize i32 f32);

/// Trap: the only "panic" a kernel has. The compiler calls these for integer division by
/// zero; kernels divide only by launch-checked sizes, so a trap means a host-side bug.
#[inline(always)]
pub fn trap() -> ! {
    crate::intrinsics::trap();
    loop {}
}

/// Required by the `#[track_caller]` convention of the panic entry points; never read.
#[lang = "panic_location"]
pub struct Location<'a> {
    file: &'a str,
    line: u32,
    col: u32,
}

#[lang = "panic_const_div_by_zero"]
#[track_caller]
#[inline(always)]
pub fn panic_const_div_by_zero() -> ! {
    trap()
}

#[lang = "panic_const_rem_by_zero"]
#[track_caller]
#[inline(always)]
pub fn panic_const_rem_by_zero() -> ! {
    trap()
}

/// `a[i]` on arrays: the compiler indexes arrays itself (with a bounds check calling
/// `panic_bounds_check`), but only where these traits are implemented.
#[lang = "index"]
pub trait Index<Idx: ?Sized> {
    type Output: ?Sized;
    fn index(&self, index: Idx) -> &Self::Output;
}

#[lang = "index_mut"]
pub trait IndexMut<Idx: ?Sized>: Index<Idx> {
    fn index_mut(&mut self, index: Idx) -> &mut Self::Output;
}

impl<T, const N: usize> Index<usize> for [T; N] {
    type Output = T;
    #[inline(always)]
    fn index(&self, i: usize) -> &T {
        &self[i]
    }
}

impl<T, const N: usize> IndexMut<usize> for [T; N] {
    #[inline(always)]
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self[i]
    }
}

#[lang = "panic_bounds_check"]
#[track_caller]
#[inline(always)]
pub fn panic_bounds_check(_index: usize, _len: usize) -> ! {
    trap()
}

#[rustc_intrinsic]
#[rustc_nounwind]
pub unsafe fn transmute<Src, Dst>(src: Src) -> Dst;

#[rustc_intrinsic]
#[rustc_nounwind]
pub unsafe fn offset<Ptr, Delta>(dst: Ptr, offset: Delta) -> Ptr;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn sqrtf32(x: f32) -> f32;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn fmaf32(a: f32, b: f32, c: f32) -> f32;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn exp2f32(x: f32) -> f32;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn maximum_number_nsz_f32(a: f32, b: f32) -> f32;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn minimum_number_nsz_f32(a: f32, b: f32) -> f32;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn fabs<T: Copy>(x: T) -> T;

#[rustc_intrinsic]
#[rustc_nounwind]
pub fn gpu_launch_sized_workgroup_mem<T>() -> *mut T;

impl<T> *const T {
    /// `self + n` elements.
    #[inline(always)]
    pub unsafe fn add(self, n: usize) -> *const T {
        unsafe { offset(self, n) }
    }
}

impl<T> *mut T {
    #[inline(always)]
    pub unsafe fn add(self, n: usize) -> *mut T {
        unsafe { offset(self, n) }
    }
}

impl f32 {
    #[inline(always)]
    pub fn sqrt(self) -> f32 {
        sqrtf32(self)
    }
    #[inline(always)]
    pub fn mul_add(self, a: f32, b: f32) -> f32 {
        fmaf32(self, a, b)
    }
    #[inline(always)]
    pub fn max(self, o: f32) -> f32 {
        maximum_number_nsz_f32(self, o)
    }
    #[inline(always)]
    pub fn min(self, o: f32) -> f32 {
        minimum_number_nsz_f32(self, o)
    }
    #[inline(always)]
    pub fn abs(self) -> f32 {
        fabs(self)
    }
}

/// `asm!`, for the PTX instructions LLVM has no intrinsic for (`mma.sync`, `cvt.rna.tf32`).
#[rustc_builtin_macro]
pub macro asm("assembly template", $(operands,)* $(options($(option),*))?) {
    /* compiler built-in */
}

/// `concat!`, for `asm!` templates built by a macro (one per element type).
#[rustc_builtin_macro]
pub macro concat($($t:tt)*) {
    /* compiler built-in */
}
