/*
 * LD_PRELOAD shim giving wrk a client certificate: wraps OpenSSL's SSL_CTX_new and loads the
 * certificate chain and key named by WRK_CLIENT_CERT and WRK_CLIENT_KEY into every new context.
 *
 *   cc -shared -fPIC -O2 -o wrk_mtls_shim.so wrk_mtls_shim.c -ldl
 *   WRK_CLIENT_CERT=client.pem WRK_CLIENT_KEY=client.key LD_PRELOAD=./wrk_mtls_shim.so wrk ...
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);
#define PEM_FILETYPE 1

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static SSL_CTX *(*real)(const SSL_METHOD *) = NULL;
    if (!real) real = (SSL_CTX * (*)(const SSL_METHOD *)) dlsym(RTLD_NEXT, "SSL_CTX_new");
    SSL_CTX *ctx = real(method);
    const char *cert = getenv("WRK_CLIENT_CERT"), *key = getenv("WRK_CLIENT_KEY");
    if (ctx && cert && key) {
        if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, key, PEM_FILETYPE) != 1) {
            fprintf(stderr, "wrk_mtls_shim: cannot load %s / %s\n", cert, key);
            exit(2);
        }
    }
    return ctx;
}
