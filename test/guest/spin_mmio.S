/*
 * spin_mmio.bin: prints "spin\n" on port 0x3F8, then loops forever reading
 * a u32 from GPA 0xE0000000 (no memslot there: every read is an MMIO exit).
 * Same boot contract as guest.S.
 */
        .intel_syntax noprefix
        .code64
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     rsi, [rip + msg]
        mov     dx, 0x3F8
1:      mov     al, byte ptr [rsi]
        test    al, al
        jz      2f
        out     dx, al
        add     rsi, 1
        jmp     1b
2:      mov     ebx, 0xE0000000         /* zero-extended; a disp32 would sign-extend */
3:      mov     eax, dword ptr [rbx]
        jmp     3b

        .section .rodata, "a"
msg:    .asciz  "spin\n"
