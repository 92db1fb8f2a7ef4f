//! Timing GPU work for benchmarks with CUDA events: a few warm-up runs, then `runs` timed
//! runs, each between two events recorded on the device's stream, reported as the median
//! (and the spread) in milliseconds. The clock stops on the GPU, not on the host, so queued
//! work is never mistaken for finished work.

use cudarc::driver::sys::CUevent_flags;

use crate::device::CudaDevice;
use crate::error::CudaError;

/// Untimed runs before the timed ones (module loading, caches, clocks).
pub const WARMUP_RUNS: usize = 3;

/// The times of repeated runs of the same work.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Each run's time in milliseconds, in the order they ran.
    pub samples_ms: Vec<f64>,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Timing {
    /// The statistics of `samples_ms`; `None` when there are none.
    pub fn from_samples(samples_ms: Vec<f64>) -> Option<Timing> {
        if samples_ms.is_empty() {
            None
        } else {
            Some(Timing::summarize(samples_ms))
        }
    }

    /// The statistics of `samples_ms` (NaN for an empty list).
    fn summarize(samples_ms: Vec<f64>) -> Timing {
        let mut sorted = samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median_ms = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[middle],
            _ => (sorted[middle - 1] + sorted[middle]) / 2.0,
        };
        Timing {
            min_ms: sorted.first().copied().unwrap_or(f64::NAN),
            max_ms: sorted.last().copied().unwrap_or(f64::NAN),
            median_ms,
            samples_ms,
        }
    }

    /// How many runs were timed.
    pub fn runs(&self) -> usize {
        self.samples_ms.len()
    }
}

/// Runs `work` [`WARMUP_RUNS`] times, then times `runs` runs (at least one) with events.
pub(crate) fn time_on_device(
    device: &CudaDevice,
    runs: usize,
    work: &mut dyn FnMut() -> Result<(), CudaError>,
) -> Result<Timing, CudaError> {
    for _ in 0..WARMUP_RUNS {
        work()?;
    }
    device.synchronize()?;
    let event = || {
        device
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|error| CudaError::driver("creating a timing event", error))
    };
    let (start, end) = (event()?, event()?);
    let mut samples = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        start
            .record(device.stream())
            .map_err(|error| CudaError::driver("recording a timing event", error))?;
        work()?;
        end.record(device.stream())
            .map_err(|error| CudaError::driver("recording a timing event", error))?;
        let elapsed = start
            .elapsed_ms(&end)
            .map_err(|error| CudaError::driver("reading a timing event", error))?;
        samples.push(f64::from(elapsed));
    }
    Ok(Timing::summarize(samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_and_max() {
        let odd = Timing::from_samples(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median_ms, odd.min_ms, odd.max_ms), (2.0, 1.0, 3.0));
        assert_eq!(odd.samples_ms, [3.0, 1.0, 2.0]);
        let even = Timing::from_samples(vec![4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median_ms, 2.5);
        assert_eq!(even.runs(), 4);
        assert!(Timing::from_samples(Vec::new()).is_none());
    }
}
