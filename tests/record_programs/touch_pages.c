/* Maps N pages (argv[1], default 16) of private anonymous memory, writes the
 * first half of them and reads the second half, then unmaps them. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 16;
	volatile char *p = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	long sum = 0;
	for (long i = 0; i < n / 2; i++)
		p[i * 4096] = 1;
	for (long i = n / 2; i < n; i++)
		sum += p[i * 4096 + 100];
	printf("%p %ld\n", (void *)p, sum);
	fflush(stdout);
	munmap((void *)p, n * 4096);
	return 3;
}
