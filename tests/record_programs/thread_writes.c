/* The main thread maps N pages (argv[1], default 32); a second thread writes
 * every one of them; the main thread then reads them after joining. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

static char *p;
static long n;

static void *writer(void *arg)
{
	(void)arg;
	for (long i = 0; i < n; i++)
		p[i * 4096] = 1;
	return NULL;
}

int main(int argc, char **argv)
{
	n = argc > 1 ? atol(argv[1]) : 32;
	p = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	pthread_t t;
	if (pthread_create(&t, NULL, writer, NULL) || pthread_join(t, NULL))
		return 1;
	long sum = 0;
	for (long i = 0; i < n; i++)
		sum += p[i * 4096];
	printf("%p %ld\n", (void *)p, sum);
	return 0;
}
