/* Grows the heap with brk through malloc of many small blocks (below the
 * mmap threshold) and writes each block; prints the break before and after. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 2000;
	void *before = sbrk(0);
	for (int i = 0; i < n; i++) {
		char *b = malloc(200);
		if (!b)
			return 1;
		b[0] = 1;
	}
	printf("%p %p\n", before, sbrk(0));
	return 0;
}
