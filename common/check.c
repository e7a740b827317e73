// Failure reporting and small allocation helpers; see check.h for the two kinds of failure.
#include "common/check.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static KltExitHook exit_hook = NULL;

void klt_set_exit_hook(KltExitHook hook) { exit_hook = hook; }

void klt_exit(int code) {
  fflush(stdout);
  fflush(stderr);
  if (exit_hook) exit_hook(code);
  exit(code);
}

void klt_fatal(const char *file, int line, const char *condition, const char *fmt, ...) {
  fprintf(stderr, "klt: internal error at %s:%d: check `%s` failed: ", file, line, condition);
  va_list args;
  va_start(args, fmt);
  vfprintf(stderr, fmt, args);
  va_end(args);
  fprintf(stderr, "\n");
  klt_exit(KLT_EXIT_BUG);
}

void klt_user_error(const char *fmt, ...) {
  fprintf(stderr, "klt: error: ");
  va_list args;
  va_start(args, fmt);
  vfprintf(stderr, fmt, args);
  va_end(args);
  fprintf(stderr, "\n");
  klt_exit(KLT_EXIT_USER_ERROR);
}

void *klt_malloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  CHECK(p != NULL, "out of host memory allocating %zu bytes", bytes);
  return p;
}

void *klt_calloc(size_t count, size_t size) {
  void *p = calloc(count ? count : 1, size ? size : 1);
  CHECK(p != NULL, "out of host memory allocating %zu x %zu bytes", count, size);
  return p;
}

void *klt_realloc(void *ptr, size_t bytes) {
  void *p = realloc(ptr, bytes ? bytes : 1);
  CHECK(p != NULL, "out of host memory reallocating %zu bytes", bytes);
  return p;
}

char *klt_strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *p = klt_malloc(n);
  memcpy(p, s, n);
  return p;
}

double klt_now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
