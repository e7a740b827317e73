/* Failure handling for all of klt. There are two kinds of failure and one way to report each.
 * A programming error (impossible shape, failed allocation, bad library call) stops the program at
 * once through CHECK, naming file, line and the failed condition: it is a bug in klt.
 * A user error (bad config value, missing file, corrupt shard, token id out of range) goes through
 * klt_user_error: one clear sentence naming the input and what to do, exit code 2, nothing destroyed.
 * Never use CHECK on user input. */
#pragma once
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {  // also included by .cu files
#endif

#define KLT_EXIT_USER_ERROR 2
#define KLT_EXIT_BUG 3

void klt_fatal(const char *file, int line, const char *condition, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));

// CHECK(cond, "format", args...): stop with file, line, the condition and the message if cond is false.
#define CHECK(cond, ...) \
  do { if (!(cond)) klt_fatal(__FILE__, __LINE__, #cond, __VA_ARGS__); } while (0)

// One sentence for the user, then exit(KLT_EXIT_USER_ERROR) (through the exit hook, see below).
void klt_user_error(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

// Under MPI a failing rank must take the whole job down rather than leave the others waiting:
// dist/ installs a hook that aborts the world with the given code. Default: exit(code).
typedef void (*KltExitHook)(int code);
void klt_set_exit_hook(KltExitHook hook);
void klt_exit(int code) __attribute__((noreturn));

// Allocation that never returns NULL (failure is a CHECK failure naming the size).
void *klt_malloc(size_t bytes);
void *klt_calloc(size_t count, size_t size);
void *klt_realloc(void *ptr, size_t bytes);
char *klt_strdup(const char *s);

// Wall-clock seconds from a monotonic clock, for progress and throughput.
double klt_now_seconds(void);

#ifdef __cplusplus
}
#endif
