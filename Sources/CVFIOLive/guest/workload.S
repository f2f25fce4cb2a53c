/*
 * vfio-live guest workload: 64-bit code run at CPL3 on a bare vCPU (identity-mapped guest RAM,
 * 2 MiB pages; see Sources/Machine/GuestLayout.swift). Assembled by the normal build into
 * section vl_guest_workload and copied into guest RAM at run time.
 *
 * Entry: %rdi = guest address of the control block (CB). Offsets (mirrored in Swift):
 *   host-written   0x08 ws_base  0x10 ws_pages  0x18 batch  0x20 dma_enabled  0x28 dma_bar
 *                  0x30 dma_src  0x38 dma_dst   0x40 dma_len 0x48 dma_every   0x50 doorbell
 *                  0x58 dma_status (BAR offset of a job-status register, nonzero = failed;
 *                       0 = the device has none, as edu)
 *   guest-written  0x80 P (page writes so far)  0x98 dma_ok  0xa0 dma_errors
 *                  0xb8 dma_phase (1 while a DMA round is in progress)  0xc0 dma_key
 *
 * Page invariant: the P-th write goes to page i = P mod N with sequence s = P div N + 1:
 *   +0 MAGIC^i   +8 s   +16 (i*K)^s   +24 (+0)^(+8)^(+16)^CHECK   +2048 s^i   +4088 s+i
 * P is published with one 8-byte store after the page is complete, so the host can tell
 * at any pause exactly which sequence every page must hold (page P mod N may be mid-write).
 *
 * DMA round (every dma_every batches when enabled): fill dma_src with P^k^PATTERN, have the
 * edu-compatible device copy it to its buffer and back to dma_dst (MMIO to its BAR0, polling
 * the command register, checking dma_status when set), compare, count ok or error.
 */
    .section vl_guest_workload, "ax"
    .globl vl_guest_workload_start
    .globl vl_guest_workload_end
    .code64
vl_guest_workload_start:
    mov     0x08(%rdi), %r8         /* ws_base */
    mov     0x10(%rdi), %r9         /* N */
    xor     %r10, %r10              /* i */
    mov     $1, %r11                /* s */
    xor     %r12, %r12              /* P */
    mov     0x48(%rdi), %r14        /* batches until the next DMA round */
.Lbatch:
    mov     0x18(%rdi), %r13
.Lpage:
    mov     %r10, %rax
    shl     $12, %rax
    add     %r8, %rax               /* page address */
    movabs  $0x564c504147450000, %rbx
    xor     %r10, %rbx
    mov     %rbx, (%rax)            /* +0 MAGIC^i */
    mov     %r11, 8(%rax)           /* +8 s */
    movabs  $0x9e3779b97f4a7c15, %rcx
    imul    %r10, %rcx
    xor     %r11, %rcx
    mov     %rcx, 16(%rax)          /* +16 (i*K)^s */
    xor     %r11, %rbx
    xor     %rcx, %rbx
    movabs  $0x5a5a5a5a5a5a5a5a, %rcx
    xor     %rcx, %rbx
    mov     %rbx, 24(%rax)          /* +24 checksum */
    mov     %r11, %rbx
    xor     %r10, %rbx
    mov     %rbx, 2048(%rax)        /* +2048 s^i */
    lea     (%r11,%r10), %rbx
    mov     %rbx, 4088(%rax)        /* +4088 s+i */
    inc     %r12
    mov     %r12, 0x80(%rdi)        /* publish P */
    inc     %r10
    cmp     %r9, %r10
    jb      1f
    xor     %r10, %r10
    inc     %r11
1:  dec     %r13
    jnz     .Lpage
    cmpq    $0, 0x20(%rdi)
    je      .Ldoorbell
    dec     %r14
    jnz     .Ldoorbell
    mov     0x48(%rdi), %r14
    /* ---- DMA round ---- */
    movq    $1, 0xb8(%rdi)
    mov     %r12, 0xc0(%rdi)        /* key */
    mov     0x30(%rdi), %rsi
    mov     0x40(%rdi), %rcx
    shr     $3, %rcx                /* words */
    xor     %rdx, %rdx
2:  mov     %r12, %rax
    xor     %rdx, %rax
    movabs  $0x3c3c3c3c3c3c3c3c, %rbx
    xor     %rbx, %rax
    mov     %rax, (%rsi,%rdx,8)
    inc     %rdx
    cmp     %rcx, %rdx
    jb      2b
    mov     0x28(%rdi), %rbx        /* BAR0 */
    mov     0x30(%rdi), %rax
    mov     %rax, 0x80(%rbx)        /* source: guest RAM */
    mov     $0x40000, %rax
    mov     %rax, 0x88(%rbx)        /* destination: device memory */
    mov     0x40(%rdi), %rax
    mov     %rax, 0x90(%rbx)        /* count */
    mov     $5, %rax
    mov     %rax, 0x98(%rbx)        /* start | IRQ, RAM -> device */
3:  mov     0x98(%rbx), %rax
    test    $1, %rax
    jnz     3b
    mov     0x58(%rdi), %rax        /* job-status register, if the device has one */
    test    %rax, %rax
    jz      6f
    mov     (%rbx,%rax), %rax
    test    %rax, %rax
    jnz     .Ldmafail
6:
    mov     $0x40000, %rax
    mov     %rax, 0x80(%rbx)
    mov     0x38(%rdi), %rax
    mov     %rax, 0x88(%rbx)
    mov     $7, %rax
    mov     %rax, 0x98(%rbx)        /* start | to RAM | IRQ, device -> RAM */
4:  mov     0x98(%rbx), %rax
    test    $1, %rax
    jnz     4b
    mov     0x58(%rdi), %rax        /* job-status register, if the device has one */
    test    %rax, %rax
    jz      6f
    mov     (%rbx,%rax), %rax
    test    %rax, %rax
    jnz     .Ldmafail
6:
    mov     0x30(%rdi), %rsi
    mov     0x38(%rdi), %rax
    xor     %rdx, %rdx
5:  mov     (%rsi,%rdx,8), %rbx
    cmp     (%rax,%rdx,8), %rbx
    jne     .Ldmafail
    inc     %rdx
    cmp     %rcx, %rdx
    jb      5b
    incq    0x98(%rdi)
    movq    $0, 0xb8(%rdi)
    jmp     .Ldoorbell
.Ldmafail:
    incq    0xa0(%rdi)
    movq    $0, 0xb8(%rdi)
.Ldoorbell:
    mov     0x50(%rdi), %rax
    mov     %r12, (%rax)            /* MMIO exit: the host counts, throttles, pauses here */
    jmp     .Lbatch
vl_guest_workload_end:
    .section .note.GNU-stack, "", @progbits
