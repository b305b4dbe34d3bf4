//! [`counters!`](crate::counters): a transport's own counters, declared once.
//!
//! ```
//! va_daemon::counters! {
//!     /// What the example counts.
//!     pub struct ExampleCounters => ExampleStats {
//!         /// Requests seen.
//!         requests,
//!         /// Bytes moved.
//!         bytes,
//!     }
//! }
//! let c = ExampleCounters::default();
//! c.requests.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
//! assert_eq!(c.snapshot().requests, 2);
//! ```
//!
//! declares `ExampleCounters` (one `AtomicU64` per name, updated with relaxed atomics from any
//! thread), `ExampleStats` (the same names as `u64`, `Serialize`: what goes under `transport` in
//! the stats) and `ExampleCounters::snapshot`.

/// Declares a counters struct, its serializable snapshot and `snapshot()` (see the module docs).
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $live:ident => $snap:ident {
            $( $(#[$fmeta:meta])* $field:ident ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $live {
            $( $(#[$fmeta])* pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        #[doc = concat!("A copy of [`", stringify!($live), "`].")]
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ::serde::Serialize)]
        pub struct $snap {
            $( $(#[$fmeta])* pub $field: u64, )*
        }

        impl $live {
            /// A consistent-enough copy of every counter.
            pub fn snapshot(&self) -> $snap {
                $snap {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }
    };
}
