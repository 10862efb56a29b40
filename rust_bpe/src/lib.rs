use pyo3::prelude::*;

#[pymodule]
fn rust_bpe(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
