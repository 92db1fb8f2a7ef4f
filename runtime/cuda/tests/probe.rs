//! Finding the GPU: on a machine without an NVIDIA driver every entry point answers with a
//! readable error and nothing panics; on a GPU machine the probe describes the device.

mod common;

use std::panic::catch_unwind;

use kiln_cuda::{
    device_count, driver_library, driver_library_candidates, locate_driver_library, probe,
    probe_device, CudaDevice, CudaError,
};

/// Whether this machine has a loadable driver library, asked independently of `probe`.
fn driver_present() -> bool {
    locate_driver_library(&driver_library_candidates()).is_ok()
}

#[test]
fn without_a_driver_the_probe_says_so() {
    if driver_present() {
        common::log_line("NOT RUN (a CUDA driver is present): the no-driver probe test");
        return;
    }
    let error = probe().expect_err("no driver, so no device");
    assert!(matches!(error, CudaError::NoDriver { .. }), "{error:?}");
    assert!(error.is_no_gpu());
    let message = error.to_string();
    assert!(message.starts_with("no CUDA driver: "), "{message}");
    assert!(message.contains("libcuda.so.1"), "{message}");
    assert!(message.contains("LD_LIBRARY_PATH"), "{message}");
}

#[test]
fn a_library_that_does_not_exist_is_no_driver() {
    let names = vec!["libkiln-no-such-driver.so.1".to_string()];
    let error = locate_driver_library(&names).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, CudaError::NoDriver { .. }), "{error:?}");
    assert!(
        message.contains("tried libkiln-no-such-driver.so.1"),
        "{message}"
    );
    let none = locate_driver_library(&[]).unwrap_err().to_string();
    assert!(none.contains("tried no library names"), "{none}");
}

#[test]
fn nothing_panics_without_a_gpu() {
    let outcome = catch_unwind(|| {
        let results = [
            probe().map(|_| ()),
            probe_device(7).map(|_| ()),
            device_count().map(|_| ()),
            driver_library().map(|_| ()),
            CudaDevice::new(0).map(|_| ()),
            CudaDevice::new(usize::MAX).map(|_| ()),
        ];
        results
            .into_iter()
            .map(|result| result.err().map(|error| error.to_string()))
            .collect::<Vec<_>>()
    });
    let messages = outcome.expect("no entry point may panic");
    if !driver_present() {
        for message in &messages {
            let message = message
                .as_deref()
                .expect("every call fails without a driver");
            assert!(message.starts_with("no CUDA driver: "), "{message}");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn with_a_gpu_the_probe_describes_it() {
    let device = common::gpu();
    let info = probe().unwrap();
    assert_eq!(&info, device.info());
    assert!(!info.name.is_empty());
    assert!(info.compute_capability >= (8, 0), "{info}");
    assert!(info.sm_count > 0 && info.total_memory > (1 << 30), "{info}");
    assert!(info.driver_version.major >= 12, "{info}");
    assert!(device_count().unwrap() >= 1);
    let beyond = probe_device(device_count().unwrap()).unwrap_err();
    assert!(matches!(beyond, CudaError::NoDevice { .. }), "{beyond}");
    common::log_line(&format!("GPU: {info}"));
}
