/* HDF5 access shared by the data loader and the checkpoint code. The serial HDF5 library is not
 * thread-safe, and the loader reads in a background thread while the main thread may save a
 * checkpoint: every HDF5 call in klt runs between h5io_lock() and h5io_unlock(). */
#pragma once

void h5io_lock(void);
void h5io_unlock(void);
// Turns off HDF5's own error-stack printing: klt reports failures itself, in one sentence.
void h5io_silence_errors(void);
