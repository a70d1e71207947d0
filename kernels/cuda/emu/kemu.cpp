/*
 * kemu.cpp - the CPU emulator behind kemu.h: coroutine scheduler for the
 * CUDA threads of a block, warp collectives, the runtime API subset
 * (memory, copies, streams, events, errors) and cuBLAS GemmEx.
 *
 * Coroutines switch with a few lines of x86-64 assembly (callee-saved
 * registers); other architectures use ucontext. Under AddressSanitizer the switches are announced with the
 * fiber API so that the per-thread stacks are understood.
 * Threading: one host thread at a time (see kemu.h).
 */
#include "kernels/cuda/emu/kemu.h"

#include "kernels/ktypes.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define KEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KEMU_ASAN 1
#endif
#endif
#ifdef KEMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old,
                                                size_t *size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile *addr, size_t size);
#endif

/* ---- context switch ------------------------------------------------------- */

#if defined(__x86_64__)
/* kemu_switch(save, to): saves the callee-saved registers on the current
 * stack, stores the stack pointer in *save and resumes the context whose
 * stack pointer is `to`. The floating-point control state (MXCSR, x87
 * control word) is shared by all coroutines: nothing in a kernel changes
 * it. The extra 8-byte slot keeps the frame 16-byte aligned. */
extern "C" void kemu_switch(void **save, void *to);
__asm__(".text\n"
        ".globl kemu_switch\n"
        ".type kemu_switch,@function\n"
        "kemu_switch:\n"
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  subq $8, %rsp\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  addq $8, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        ".size kemu_switch, .-kemu_switch\n"
        ".section .note.GNU-stack,\"\",@progbits\n"
        ".text\n");
#endif

namespace {

enum { T_NEW = 0, T_READY, T_BAR, T_WARP, T_DONE };

const size_t STACK_BYTES = 128 * 1024;
const size_t SLOT_BYTES = 64; /* per lane in a warp collective */

struct kthread {
    void *sp;
    char *stack;
    void *fake; /* ASan fake stack of this fiber */
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    kemu_uint3 tid;
    int lane, warp;
    int state;
};

struct block_state {
    std::vector<kthread> th;
    std::vector<unsigned char> slots; /* [n_warps][32][SLOT_BYTES] */
    std::vector<int> slot_live;       /* [n_warps][32] lane deposited */
    std::vector<unsigned char> smem;
    void *sched_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t sched_uc;
#endif
    const void *sched_bottom = nullptr;
    size_t sched_size = 0;
    void *sched_fake = nullptr;
    const std::function<void()> *body = nullptr;
    kthread *cur = nullptr;
    bool failed = false;
    std::string why;
};

block_state g_blk;
std::vector<char *> g_stack_pool;
cudaError_t g_last = cudaSuccess;
std::map<uintptr_t, size_t> g_allocs;
std::map<const void *, int> g_smem_limit;
const char *g_kernel_name = "";

char *stack_get()
{
    if (!g_stack_pool.empty()) {
        char *s = g_stack_pool.back();
        g_stack_pool.pop_back();
        return s;
    }
    void *p = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "kemu: cannot map a thread stack\n");
        abort(); /* test infrastructure only: nothing sensible to fall back to */
    }
    return (char *)p;
}

void stack_put(char *s)
{
    if (s)
        g_stack_pool.push_back(s);
}

void fiber_enter_done(kthread *t)
{
#ifdef KEMU_ASAN
    __sanitizer_finish_switch_fiber(t->fake, &g_blk.sched_bottom, &g_blk.sched_size);
#else
    (void)t;
#endif
}

/* Suspends the current CUDA thread (its state already set) until the
 * scheduler resumes it. */
void yield_to_scheduler()
{
    kthread *t = g_blk.cur;
#ifdef KEMU_ASAN
    __sanitizer_start_switch_fiber(&t->fake, g_blk.sched_bottom, g_blk.sched_size);
#endif
#if defined(__x86_64__)
    kemu_switch(&t->sp, g_blk.sched_sp);
#else
    swapcontext(&t->uc, &g_blk.sched_uc);
#endif
    fiber_enter_done(t);
}

[[noreturn]] void thread_start()
{
    kthread *t = g_blk.cur;
    fiber_enter_done(t);
    (*g_blk.body)();
    t->state = T_DONE;
#ifdef KEMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, g_blk.sched_bottom, g_blk.sched_size);
#endif
#if defined(__x86_64__)
    void *dummy;
    kemu_switch(&dummy, g_blk.sched_sp);
#else
    setcontext(&g_blk.sched_uc);
#endif
    abort(); /* unreachable */
}

#if !defined(__x86_64__)
void thread_start_uc() { thread_start(); }
#endif

void thread_init_stack(kthread *t)
{
    t->stack = stack_get();
#ifdef KEMU_ASAN
    /* a reused stack still carries the poisoned redzones of the frames of
     * the coroutine that last ran on it */
    __asan_unpoison_memory_region(t->stack, STACK_BYTES);
#endif
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)t->stack + STACK_BYTES) & ~(uintptr_t)15;
    uint64_t *p = (uint64_t *)top;
    *--p = 0;                          /* fake return address of thread_start */
    *--p = (uint64_t)(uintptr_t)&thread_start; /* popped by ret */
    for (int i = 0; i < 6; i++)
        *--p = 0;                      /* rbp rbx r12 r13 r14 r15 */
    *--p = 0;                          /* alignment slot */
    t->sp = p;
#else
    getcontext(&t->uc);
    t->uc.uc_stack.ss_sp = t->stack;
    t->uc.uc_stack.ss_size = STACK_BYTES;
    t->uc.uc_link = nullptr;
    makecontext(&t->uc, (void (*)())thread_start_uc, 0);
#endif
}

void run_thread(kthread *t)
{
    g_blk.cur = t;
#ifdef KEMU_ASAN
    __sanitizer_start_switch_fiber(&g_blk.sched_fake, t->stack, STACK_BYTES);
#endif
#if defined(__x86_64__)
    kemu_switch(&g_blk.sched_sp, t->sp);
#else
    swapcontext(&g_blk.sched_uc, &t->uc);
#endif
#ifdef KEMU_ASAN
    __sanitizer_finish_switch_fiber(g_blk.sched_fake, nullptr, nullptr);
#endif
    g_blk.cur = nullptr;
    if (t->state == T_DONE) {
        stack_put(t->stack);
        t->stack = nullptr;
    }
}

/* Runs one block to completion (or a detected deadlock). */
bool run_block(unsigned nthreads, int round0)
{
    block_state &b = g_blk;
    int n_warps = (int)((nthreads + 31) / 32);
    b.th.assign(nthreads, kthread());
    b.slots.assign((size_t)n_warps * 32 * SLOT_BYTES, 0);
    b.slot_live.assign((size_t)n_warps * 32, 0);
    unsigned bx = kemu_block_dim.x, by = kemu_block_dim.y;
    for (unsigned i = 0; i < nthreads; i++) {
        kthread &t = b.th[i];
        t.tid = kemu_uint3{i % bx, (i / bx) % by, i / (bx * by)};
        t.lane = (int)(i % 32);
        t.warp = (int)(i / 32);
        t.state = T_NEW;
        t.stack = nullptr;
        t.fake = nullptr;
    }
    int round = round0;
    for (;;) {
        bool ran = false;
        for (unsigned j = 0; j < nthreads; j++) {
            /* alternate the order so that code relying on an order between
             * threads without a barrier is likely to go wrong */
            unsigned i = (round & 1) ? nthreads - 1 - j : j;
            kthread &t = b.th[i];
            if (t.state == T_NEW) {
                thread_init_stack(&t);
                t.state = T_READY;
            }
            if (t.state == T_READY) {
                run_thread(&t);
                ran = true;
            }
        }
        round++;
        unsigned live = 0, at_bar = 0;
        for (auto &t : b.th) {
            if (t.state != T_DONE)
                live++;
            if (t.state == T_BAR)
                at_bar++;
        }
        if (live == 0)
            return true;
        bool released = false;
        if (at_bar == live) {
            for (auto &t : b.th)
                if (t.state == T_BAR)
                    t.state = T_READY;
            released = true;
        }
        for (int w = 0; w < n_warps; w++) {
            int lw = 0, aw = 0;
            for (unsigned i = (unsigned)w * 32; i < nthreads && i < (unsigned)w * 32 + 32; i++) {
                if (b.th[i].state != T_DONE)
                    lw++;
                if (b.th[i].state == T_WARP)
                    aw++;
            }
            if (lw > 0 && aw == lw) {
                for (unsigned i = (unsigned)w * 32; i < nthreads && i < (unsigned)w * 32 + 32; i++)
                    if (b.th[i].state == T_WARP)
                        b.th[i].state = T_READY;
                released = true;
            }
        }
        if (!released && !ran) {
            char buf[256];
            snprintf(buf, sizeof buf,
                     "kernel %s block (%u,%u,%u): deadlock (%u live threads, %u at "
                     "__syncthreads; a barrier or warp collective is not reached by all)",
                     g_kernel_name, kemu_block_idx.x, kemu_block_idx.y, kemu_block_idx.z, live,
                     at_bar);
            b.why = buf;
            for (auto &t : b.th) { /* abandon the coroutines */
                stack_put(t.stack);
                t.stack = nullptr;
            }
            return false;
        }
    }
}

bool is_device_range(const void *p, size_t n, bool *known)
{
    uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    *known = false;
    if (it == g_allocs.begin())
        return true;
    --it;
    if (a >= it->first && a < it->first + it->second) {
        *known = true;
        return a + n <= it->first + it->second;
    }
    return true;
}

cudaError_t set_err(cudaError_t e)
{
    if (e != cudaSuccess && g_last == cudaSuccess)
        g_last = e;
    return e;
}

} // namespace

/* ---- thread-visible state ----------------------------------------------------- */

kemu_uint3 kemu_block_idx;
dim3 kemu_block_dim, kemu_grid_dim;

const kemu_uint3 &kemu_thread_idx()
{
    return g_blk.cur->tid;
}

int kemu_lane()
{
    return g_blk.cur->lane;
}

void *kemu_dyn_smem()
{
    return g_blk.smem.data();
}

void __syncthreads()
{
    g_blk.cur->state = T_BAR;
    yield_to_scheduler();
}

void __syncwarp(unsigned)
{
    g_blk.cur->state = T_WARP;
    yield_to_scheduler();
}

void kemu_warp_gather(const void *mine, size_t size, void *all)
{
    kthread *t = g_blk.cur;
    if (size > SLOT_BYTES) {
        fprintf(stderr, "kemu: warp collective of %zu bytes\n", size);
        abort();
    }
    size_t base = (size_t)t->warp * 32;
    memcpy(&g_blk.slots[(base + (size_t)t->lane) * SLOT_BYTES], mine, size);
    g_blk.slot_live[base + (size_t)t->lane] = 1;
    __syncwarp();
    for (int l = 0; l < 32; l++) {
        size_t i = base + (size_t)l;
        bool live = i < g_blk.th.size() && g_blk.th[i].state != T_DONE && g_blk.slot_live[i];
        if (live)
            memcpy((char *)all + (size_t)l * size, &g_blk.slots[i * SLOT_BYTES], size);
        else
            memset((char *)all + (size_t)l * size, 0, size);
    }
    __syncwarp();
    g_blk.slot_live[base + (size_t)t->lane] = 0;
}

void kemu_warp_exchange(const void *mine, size_t size, int src, void *out)
{
    kthread *t = g_blk.cur;
    size_t base = (size_t)t->warp * 32;
    memcpy(&g_blk.slots[(base + (size_t)t->lane) * SLOT_BYTES], mine, size);
    g_blk.slot_live[base + (size_t)t->lane] = 1;
    __syncwarp();
    size_t i = base + (size_t)src;
    if (i < g_blk.th.size() && g_blk.th[i].state != T_DONE && g_blk.slot_live[i])
        memcpy(out, &g_blk.slots[i * SLOT_BYTES], size);
    else
        memset(out, 0, size);
    __syncwarp();
    g_blk.slot_live[base + (size_t)t->lane] = 0;
}

unsigned __ballot_sync(unsigned, int pred)
{
    int v = pred != 0, all[32];
    kemu_warp_gather(&v, sizeof v, all);
    unsigned m = 0;
    for (int l = 0; l < 32; l++)
        m |= (unsigned)(all[l] != 0) << l;
    return m;
}

int __any_sync(unsigned mask, int pred)
{
    return __ballot_sync(mask, pred) != 0;
}

int __all_sync(unsigned mask, int pred)
{
    /* lanes that exited count as agreeing */
    kthread *t = g_blk.cur;
    unsigned live = 0;
    for (int l = 0; l < 32; l++) {
        size_t i = (size_t)t->warp * 32 + (size_t)l;
        if (i < g_blk.th.size() && g_blk.th[i].state != T_DONE)
            live |= 1u << l;
    }
    return (__ballot_sync(mask, pred) & live) == live;
}

static float h2f_lo(uint32_t r) { return kemu_f16_to_f32((unsigned short)(r & 0xffffu)); }
static float h2f_hi(uint32_t r) { return kemu_f16_to_f32((unsigned short)(r >> 16)); }

void kemu_mma16816(float d[4], const uint32_t a[4], const uint32_t b[2])
{
    struct frag {
        uint32_t a[4], b[2];
    } mine, all[32];
    memcpy(mine.a, a, sizeof mine.a);
    memcpy(mine.b, b, sizeof mine.b);
    kemu_warp_gather(&mine, sizeof mine, all);
    /* PTX ISA, mma.m16n8k16 .f16: groupID = lane >> 2, tig = lane % 4;
     * A (row-major 16x16): a0,a1 (row g, cols 2t, 2t+1), a2,a3 (row g+8),
     * a4,a5 (row g, cols +8), a6,a7 (row g+8, cols +8);
     * B (16x8): b0,b1 (rows 2t, 2t+1, col g), b2,b3 (rows +8);
     * C/D (16x8): c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8). */
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l >> 2, t = l & 3;
        const frag &f = all[l];
        A[g][2 * t] = h2f_lo(f.a[0]);
        A[g][2 * t + 1] = h2f_hi(f.a[0]);
        A[g + 8][2 * t] = h2f_lo(f.a[1]);
        A[g + 8][2 * t + 1] = h2f_hi(f.a[1]);
        A[g][2 * t + 8] = h2f_lo(f.a[2]);
        A[g][2 * t + 9] = h2f_hi(f.a[2]);
        A[g + 8][2 * t + 8] = h2f_lo(f.a[3]);
        A[g + 8][2 * t + 9] = h2f_hi(f.a[3]);
        B[2 * t][g] = h2f_lo(f.b[0]);
        B[2 * t + 1][g] = h2f_hi(f.b[0]);
        B[2 * t + 8][g] = h2f_lo(f.b[1]);
        B[2 * t + 9][g] = h2f_hi(f.b[1]);
    }
    int lane = kemu_lane(), g = lane >> 2, t = lane & 3;
    int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; i++) {
        float s = 0.0f;
        for (int k = 0; k < 16; k++)
            s += A[rows[i]][k] * B[k][cols[i]]; /* products of halves are exact in f32 */
        d[i] += s;
    }
}

/* The oracle's conversions (kernels/ktypes.h): the emulated __float2half_rn
 * and __half2float are exact IEEE conversions, as the hardware's. */
unsigned short kemu_f32_to_f16(float f)
{
    return kt_f32_to_f16(f);
}

float kemu_f16_to_f32(unsigned short h)
{
    return kt_f16_to_f32(h);
}

/* ---- launch ------------------------------------------------------------------- */

cudaError_t kemu_func_set_attribute(const void *f, cudaFuncAttribute a, int v)
{
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || v > 227 * 1024)
        return set_err(cudaErrorInvalidValue);
    g_smem_limit[f] = v;
    return cudaSuccess;
}

void kemu_launch(const void *fn, const char *name, dim3 grid, dim3 block, size_t smem,
                 cudaStream_t, const std::function<void()> &body)
{
    unsigned nthreads = block.x * block.y * block.z;
    size_t limit = 48 * 1024;
    auto it = g_smem_limit.find(fn);
    if (it != g_smem_limit.end() && (size_t)it->second > limit)
        limit = (size_t)it->second;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535 || smem > limit) {
        fprintf(stderr,
                "kemu: %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) "
                "smem %zu (limit %zu)\n",
                name, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, limit);
        set_err(cudaErrorInvalidConfiguration);
        return;
    }
    if (g_last != cudaSuccess)
        return; /* a sticky error: the context is unusable, like a real device's */
    g_kernel_name = name;
    kemu_grid_dim = grid;
    kemu_block_dim = block;
    g_blk.body = &body;
    g_blk.smem.assign(smem + 16, 0xcd); /* garbage: shared memory is not zeroed */
    static int round0;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                kemu_block_idx = kemu_uint3{x, y, z};
                if (!run_block(nthreads, round0++)) {
                    fprintf(stderr, "kemu: %s\n", g_blk.why.c_str());
                    set_err(cudaErrorLaunchFailure);
                    return;
                }
            }
}

/* ---- runtime API ------------------------------------------------------------------ */

static bool no_device()
{
    const char *e = getenv("KEMU_NO_DEVICE");
    return e && *e && strcmp(e, "0") != 0;
}

cudaError_t cudaGetDeviceCount(int *n)
{
    *n = no_device() ? 0 : 1;
    return no_device() ? cudaErrorNoDevice : cudaSuccess;
}

cudaError_t cudaSetDevice(int d)
{
    return d == 0 && !no_device() ? cudaSuccess : set_err(cudaErrorInvalidDevice);
}

cudaError_t cudaGetDevice(int *d)
{
    *d = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d)
{
    if (d != 0 || no_device())
        return set_err(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "kemu (CPU emulation)");
    p->totalGlobalMem = (size_t)8 << 30;
    p->sharedMemPerBlock = 48 * 1024;
    p->sharedMemPerBlockOptin = 227 * 1024;
    p->multiProcessorCount = 4;
    p->major = 9;
    p->minor = 0;
    p->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *v)
{
    *v = 13000;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v)
{
    *v = 13000;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t n)
{
    *p = nullptr;
    void *q = aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    if (!q)
        return set_err(cudaErrorMemoryAllocation);
    memset(q, 0xcd, n); /* device memory is not zeroed */
    g_allocs[(uintptr_t)q] = n;
    *p = q;
    return cudaSuccess;
}

cudaError_t cudaFree(void *p)
{
    if (!p)
        return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end())
        return set_err(cudaErrorInvalidValue);
    g_allocs.erase(it);
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t n)
{
    *p = malloc(n ? n : 1);
    return *p ? cudaSuccess : set_err(cudaErrorMemoryAllocation);
}

cudaError_t cudaFreeHost(void *p)
{
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b)
{
    *total_b = (size_t)8 << 30;
    *free_b = (size_t)6 << 30;
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind)
{
    bool kd, ks;
    if (!is_device_range(d, n, &kd) || !is_device_range(s, n, &ks)) {
        fprintf(stderr, "kemu: cudaMemcpy of %zu bytes beyond a device allocation\n", n);
        return set_err(cudaErrorInvalidValue);
    }
    if (n)
        memmove(d, s, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t)
{
    return cudaMemcpy(d, s, n, k);
}

cudaError_t cudaMemset(void *d, int v, size_t n)
{
    bool kd;
    if (!is_device_range(d, n, &kd) || !kd) {
        fprintf(stderr, "kemu: cudaMemset of %zu bytes outside a device allocation\n", n);
        return set_err(cudaErrorInvalidValue);
    }
    memset(d, v, n);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t)
{
    return cudaMemset(d, v, n);
}

struct kemu_stream {
    int dummy;
};
struct kemu_event {
    double t;
};

cudaError_t cudaStreamCreate(cudaStream_t *s)
{
    *s = new kemu_stream();
    return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned)
{
    return cudaStreamCreate(s);
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    delete s;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t)
{
    return g_last;
}

cudaError_t cudaDeviceSynchronize()
{
    return g_last;
}

cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    *e = new kemu_event();
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t)
{
    e->t = std::chrono::duration<double, std::milli>(
               std::chrono::steady_clock::now().time_since_epoch())
               .count();
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t)
{
    return g_last;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    *ms = (float)(b->t - a->t);
    return cudaSuccess;
}

cudaError_t cudaGetLastError()
{
    cudaError_t e = g_last;
    /* like a real device, a launch failure is sticky */
    if (e != cudaErrorLaunchFailure)
        g_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError()
{
    return g_last;
}

const char *cudaGetErrorName(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator)";
    }
    return "unknown error";
}

/* ---- cuBLAS ---------------------------------------------------------------------- */

struct kemu_cublas {
    int dummy;
};

cublasStatus_t cublasCreate(cublasHandle_t *h)
{
    if (no_device())
        return CUBLAS_STATUS_NOT_INITIALIZED;
    *h = new kemu_cublas();
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h)
{
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t)
{
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t)
{
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusString(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

static bool elem_to_float(const void *p, cudaDataType t, size_t i, float *out)
{
    switch (t) {
    case CUDA_R_32F: *out = ((const float *)p)[i]; return true;
    case CUDA_R_16F: *out = kemu_f16_to_f32(((const unsigned short *)p)[i]); return true;
    case CUDA_R_16BF: *out = __uint_as_float((unsigned)((const unsigned short *)p)[i] << 16); return true;
    }
    return false;
}

/* Column-major C (m x n) = alpha op(A) op(B) + beta C, f32 accumulation. */
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                            int m, int n, int k, const void *alpha, const void *A,
                            cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
                            const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t comp, cublasGemmAlgo_t)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || ct != CUDA_R_32F || at != bt ||
        (comp != CUBLAS_COMPUTE_32F && comp != CUBLAS_COMPUTE_32F_PEDANTIC) ||
        lda < (ta == CUBLAS_OP_N ? m : k) || ldb < (tb == CUBLAS_OP_N ? k : n) || ldc < m)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (g_last != cudaSuccess)
        return CUBLAS_STATUS_SUCCESS; /* the failure surfaces at the next sync */
    float al = *(const float *)alpha, be = *(const float *)beta;
    /* op(A) rows and op(B) columns as contiguous float vectors over k */
    std::vector<float> a((size_t)m * (size_t)k), b((size_t)n * (size_t)k);
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++) {
            size_t idx = ta == CUBLAS_OP_N ? (size_t)i + (size_t)p * (size_t)lda
                                           : (size_t)p + (size_t)i * (size_t)lda;
            if (!elem_to_float(A, at, idx, &a[(size_t)i * (size_t)k + (size_t)p]))
                return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    for (int j = 0; j < n; j++)
        for (int p = 0; p < k; p++) {
            size_t idx = tb == CUBLAS_OP_N ? (size_t)p + (size_t)j * (size_t)ldb
                                           : (size_t)j + (size_t)p * (size_t)ldb;
            if (!elem_to_float(B, bt, idx, &b[(size_t)j * (size_t)k + (size_t)p]))
                return CUBLAS_STATUS_NOT_SUPPORTED;
        }
    float *c = (float *)C;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            const float *ai = &a[(size_t)i * (size_t)k], *bj = &b[(size_t)j * (size_t)k];
            /* eight partial sums (vectorizable; cuBLAS's order is not
             * specified either) */
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int p = 0;
            for (; p + 8 <= k; p += 8)
                for (int u = 0; u < 8; u++)
                    acc[u] += ai[p + u] * bj[p + u];
            float s = 0.0f;
            for (; p < k; p++)
                s += ai[p] * bj[p];
            s += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            float *ci = &c[(size_t)i + (size_t)j * (size_t)ldc];
            *ci = be == 0.0f ? al * s : al * s + be * *ci;
        }
    return CUBLAS_STATUS_SUCCESS;
}
