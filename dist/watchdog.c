// The step watchdog; see watchdog.h.
#include "dist/watchdog.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "common/check.h"

struct Watchdog {
  pthread_t thread;
  double timeout;
  int rank;
  _Atomic long step;
  _Atomic double deadline;
  atomic_bool running;
};

static void *watch(void *arg) {
  Watchdog *w = arg;
  while (atomic_load(&w->running)) {
    sleep(1);
    if (klt_now_seconds() > atomic_load(&w->deadline)) {
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

Watchdog *watchdog_start(double timeout_seconds, int rank) {
  if (timeout_seconds <= 0) return NULL;
  Watchdog *w = klt_calloc(1, sizeof *w);
  w->timeout = timeout_seconds;
  w->rank = rank;
  atomic_store(&w->deadline, klt_now_seconds() + timeout_seconds);
  atomic_store(&w->running, true);
  CHECK(pthread_create(&w->thread, NULL, watch, w) == 0, "cannot start the watchdog thread");
  return w;
}

void watchdog_arm(Watchdog *w, long step) {
  if (!w) return;
  atomic_store(&w->step, step);
  atomic_store(&w->deadline, klt_now_seconds() + w->timeout);
}

void watchdog_stop(Watchdog *w) {
  if (!w) return;
  atomic_store(&w->running, false);
  pthread_join(w->thread, NULL);
  free(w);
}
