//! Reuse of large buffers within a step.
//!
//! A prefill step frees and allocates many large intermediate buffers (attention scores of
//! `heads·seq²` values, MLP activations). Fresh large allocations come from the OS as untouched
//! pages, and faulting them in costs as much as the arithmetic on them. While a step runs
//! ([`with_pool`]), large buffers freed on the stepping thread are kept here (see `Buffer`'s
//! `Drop`) and handed out again by [`buffer`] and [`with_capacity`]; the pool is dropped with the
//! step, so nothing is retained between steps.

use super::tensor::Elem;
use std::cell::RefCell;

/// Buffers smaller than this many elements are left to the allocator.
const MIN_POOLED: usize = 1 << 15;
/// Most bytes the pool holds at once.
const MAX_POOLED_BYTES: usize = 1 << 30;

/// Free buffers, by element type.
#[derive(Default)]
pub(crate) struct Pool {
    pub(crate) f32s: Vec<Vec<f32>>,
    pub(crate) i32s: Vec<Vec<i32>>,
    bytes: usize,
}

thread_local! {
    static ACTIVE: RefCell<Option<Pool>> = const { RefCell::new(None) };
}

/// Runs `f` with a pool serving large allocations on this thread, and drops the pool after.
pub(crate) fn with_pool<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Pool>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            let pool = ACTIVE.with(|a| a.replace(prev));
            drop(pool);
        }
    }
    let prev = ACTIVE.with(|a| a.replace(Some(Pool::default())));
    let _reset = Reset(prev);
    f()
}

/// Takes the pooled buffer of the smallest capacity in `n ..= 2n` satisfying `ok`.
fn take<T: Elem>(n: usize, ok: impl Fn(&Vec<T>) -> bool) -> Option<Vec<T>> {
    if n < MIN_POOLED {
        return None;
    }
    ACTIVE
        .try_with(|a| {
            let mut a = a.borrow_mut();
            let pool = a.as_mut()?;
            let list = T::pooled(pool);
            let best = (0..list.len())
                .filter(|&i| ok(&list[i]) && list[i].capacity() <= 2 * n)
                .min_by_key(|&i| list[i].capacity())?;
            let v = list.swap_remove(best);
            pool.bytes -= v.capacity() * std::mem::size_of::<T>();
            Some(v)
        })
        .ok()
        .flatten()
}

/// A vector of `n` elements whose values are unspecified (zeros or old data): for callers that
/// overwrite every element.
pub(crate) fn buffer<T: Elem>(n: usize) -> Vec<T> {
    match take::<T>(n, |v| v.len() >= n) {
        Some(mut v) => {
            v.truncate(n);
            v
        }
        None => vec![T::default(); n],
    }
}

/// An empty vector with room for `n` elements.
pub(crate) fn with_capacity<T: Elem>(n: usize) -> Vec<T> {
    match take::<T>(n, |v| v.capacity() >= n) {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(n),
    }
}

/// Keeps a freed buffer for reuse if a pool is active and has room; frees it otherwise.
pub(crate) fn recycle<T: Elem>(v: Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if v.capacity() < MIN_POOLED {
        return;
    }
    let _ = ACTIVE.try_with(|a| {
        // A drop while the pool itself is borrowed (never expected) just frees the buffer.
        let Ok(mut a) = a.try_borrow_mut() else {
            return;
        };
        if let Some(pool) = a.as_mut() {
            if pool.bytes + bytes <= MAX_POOLED_BYTES {
                pool.bytes += bytes;
                T::pooled(pool).push(v);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_within_a_step_only() {
        let n = MIN_POOLED * 2;
        let ptr = with_pool(|| {
            let v: Vec<f32> = buffer(n);
            let ptr = v.as_ptr();
            recycle(v);
            let again: Vec<f32> = buffer(n - 5);
            assert_eq!((again.as_ptr(), again.len()), (ptr, n - 5));
            let bigger: Vec<f32> = buffer(n + 1);
            assert_ne!(bigger.as_ptr(), ptr);
            let small: Vec<f32> = with_capacity(10);
            assert!(
                small.capacity() < MIN_POOLED,
                "small requests do not take pooled buffers"
            );
            recycle(again);
            ptr
        });
        let after: Vec<f32> = buffer(n);
        assert!(after.as_ptr() != ptr || after.iter().all(|&x| x == 0.0));
        assert!(ACTIVE.with(|a| a.borrow().is_none()));
    }
}
