// The step watchdog; see watchdog.h.
#include "dist/watchdog.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/check.h"
#ifdef KLT_HAVE_CUDA
#include "dist/comm.h"
#endif

struct Watchdog {
  pthread_t thread;
  double timeout;
  int rank;
  _Atomic long step;
  _Atomic double deadline;
  atomic_bool running;
  const struct Comm *comm;  // NCCL communicators to poll, or NULL
};

static void *watch(void *arg) {
  Watchdog *w = arg;
  while (atomic_load(&w->running)) {
    sleep(1);
#ifdef KLT_HAVE_CUDA
    char message[512];
    if (w->comm && !comm_healthy(w->comm, message, sizeof message)) {
      fprintf(stderr, "klt: error: rank %d: step %ld: %s: a peer rank died or its link failed (look at the other "
              "ranks' messages); stopping so the job does not hang\n", w->rank, atomic_load(&w->step) + 1, message);
      fflush(stderr);
      _exit(KLT_EXIT_BUG);
    }
#endif
    if (w->timeout > 0 && klt_now_seconds() > atomic_load(&w->deadline)) {
      fprintf(stderr,
              "klt: error: rank %d: step %ld did not finish within [train] step_timeout = %.0f s: a rank hung or "
              "died (look at the other ranks' messages); stopping so the job does not hang\n",
              w->rank, atomic_load(&w->step) + 1, w->timeout);
      fflush(stderr);
      _exit(KLT_EXIT_BUG);  // the main thread may be stuck inside a collective: leave without it
    }
  }
  return NULL;
}

Watchdog *watchdog_start(double timeout_seconds, int rank) { return watchdog_start_with(timeout_seconds, rank, NULL); }

Watchdog *watchdog_start_with(double timeout_seconds, int rank, const struct Comm *comm) {
  if (timeout_seconds <= 0 && !comm) return NULL;
  Watchdog *w = klt_calloc(1, sizeof *w);
  w->timeout = timeout_seconds;
  w->rank = rank;
  w->comm = comm;
  atomic_store(&w->deadline, klt_now_seconds() + (timeout_seconds > 0 ? timeout_seconds : 0));
  atomic_store(&w->running, true);
  CHECK(pthread_create(&w->thread, NULL, watch, w) == 0, "cannot start the watchdog thread");
  return w;
}

void watchdog_arm(Watchdog *w, long step) {
  if (!w) return;
  atomic_store(&w->step, step);
  if (w->timeout > 0) atomic_store(&w->deadline, klt_now_seconds() + w->timeout);
}

void watchdog_stop(Watchdog *w) {
  if (!w) return;
  atomic_store(&w->running, false);
  pthread_join(w->thread, NULL);
  free(w);
}
