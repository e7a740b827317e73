// The process-wide HDF5 lock; see h5io.h.
#include "data/h5io.h"

#include <hdf5.h>
#include <pthread.h>

static pthread_mutex_t h5_mutex = PTHREAD_MUTEX_INITIALIZER;

void h5io_lock(void) { pthread_mutex_lock(&h5_mutex); }
void h5io_unlock(void) { pthread_mutex_unlock(&h5_mutex); }
void h5io_silence_errors(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }
