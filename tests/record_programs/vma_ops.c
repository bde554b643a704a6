/* mprotect, mremap (grow with a move, shrink in place) and munmap on one
 * private anonymous mapping; prints the addresses it got. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define PG 4096

int main(void)
{
	char *p = mmap(NULL, 9 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* a PROT_NONE page right above the 8 used ones, so that growing them must move */
	char *fence = p + 8 * PG;
	if (p == MAP_FAILED || mprotect(fence, PG, PROT_NONE))
		return 1;
	for (int i = 0; i < 8; i++)
		p[i * PG] = 1;
	if (mprotect(p + 2 * PG, 2 * PG, PROT_READ))
		return 1;
	volatile char c = p[2 * PG];
	(void)c;
	if (mprotect(p + 2 * PG, 2 * PG, PROT_READ | PROT_WRITE))
		return 1;
	char *q = mremap(p, 8 * PG, 16 * PG, MREMAP_MAYMOVE);
	if (q == MAP_FAILED || q == p)
		return 1;
	/* the 8 moved pages came with their contents: writing them again faults nothing */
	for (int i = 0; i < 16; i++)
		q[i * PG] = 2;
	char *r = mremap(q, 16 * PG, 4 * PG, 0);
	if (r != q)
		return 1;
	printf("p=%p fence=%p q=%p\n", (void *)p, (void *)fence, (void *)q);
	fflush(stdout);
	munmap(fence, PG);
	return 0; /* q stays mapped: the check at exit sees its 4 pages */
}
