/* read() from /dev/zero into N fresh pages (argv[1], default 8): the kernel
 * writes them inside the system call, so each first touch is a kernel-mode
 * fault. Then write()s them to /dev/null: no new fault. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 8;
	char *p = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd = open("/dev/zero", O_RDONLY);
	int out = open("/dev/null", O_WRONLY);
	if (p == MAP_FAILED || fd < 0 || out < 0)
		return 1;
	if (read(fd, p, n * 4096) != n * 4096)
		return 1;
	if (write(out, p, n * 4096) != n * 4096)
		return 1;
	printf("%p\n", (void *)p);
	return 0;
}
