/* Starts 3 threads that each write pages of their own mapping and then spin;
 * the main thread waits until all have written and returns from main
 * (exit_group while the others still run). With argv[1] = "abort", it dies
 * of SIGABRT instead. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static atomic_int ready;

static void *worker(void *arg)
{
	char *p = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (int i = 0; i < 4; i++)
		p[i * 4096] = 1;
	atomic_fetch_add(&ready, 1);
	for (;;)
		;
	return arg;
}

int main(int argc, char **argv)
{
	pthread_t t[3];
	for (int i = 0; i < 3; i++)
		pthread_create(&t[i], NULL, worker, NULL);
	while (atomic_load(&ready) < 3)
		;
	if (argc > 1 && !strcmp(argv[1], "abort"))
		raise(SIGABRT);
	return 0;
}
